"""Fetch a URL supplied by someone we do not trust, without letting them reach our own network.

Why this exists: a job may name a reference voice by URL, and the worker runs inside a cloud network where
``http://169.254.169.254/`` hands out credentials and ``http://10.x`` reaches neighbours. So every host is
resolved first, every resolved address is vetted, and the connection goes to the vetted address itself (not to
the name again), which closes the DNS-rebinding gap between check and connect. TLS still verifies the
certificate against the real host name and sends it as SNI. Redirects are followed by hand, each hop vetted by
the same rule. Size and time are capped for the whole fetch, so a slow or endless body cannot pin a worker.

Standard library only: ``http.client`` accepts a socket we opened ourselves, which is the simplest way to pin
the address while keeping ``Host`` and SNI honest.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from higgs_worker.errors import FetchError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024

# Cloud instance-metadata endpoints (AWS, GCP, Azure, Oracle, Alibaba, AWS IPv6). Most already fail the
# "globally reachable" test; listing them keeps them refused even for a host on the operator's allow-list.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")
)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchPolicy:
    """What one fetch may do.

    ``allowed_hosts`` are host names (lower case) trusted to resolve to private addresses: the operator's own
    services. ``ca_file`` replaces the system trust store (tests use a self-signed CA); ``None`` keeps the
    system store, which OpenSSL lets operators redirect with ``SSL_CERT_FILE``.
    """

    max_bytes: int
    timeout_s: float
    allowed_schemes: frozenset[str] = frozenset({"https"})
    allowed_hosts: frozenset[str] = frozenset()
    max_redirects: int = 5
    ca_file: str | None = None


def public_url(url: str) -> str:
    """The URL as it may appear in logs and errors: no credentials, no query string, no fragment.

    Signed URLs (S3 presigned, tokens) carry their secret in the query, so it is never repeated back.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def is_forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for any address that is not a public unicast destination (or is a metadata endpoint).

    IPv4 addresses wrapped in IPv6 (``::ffff:10.0.0.1``, NAT64 ``64:ff9b::a00:1``) are judged by the IPv4
    address they carry, since that is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64_PREFIX:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return (
        address in METADATA_ADDRESSES
        or not address.is_global
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """GET ``url`` under ``policy`` and return the whole body, or raise :class:`FetchError`.

    The content type is not returned on purpose: callers decide what the bytes are by decoding them.
    """
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        response = _get_once(current, policy, deadline)
        if isinstance(response, bytes):
            return response
        current = response
    raise FetchError(f"{public_url(url)} redirected more than {policy.max_redirects} times")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _parse(url: str, policy: FetchPolicy) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        allowed = " or ".join(f"{name}://" for name in sorted(policy.allowed_schemes))
        raise FetchError(f"{public_url(url)} uses a scheme that is not allowed; use {allowed}")
    try:
        port = parts.port
    except ValueError:
        raise FetchError(f"{public_url(url)} has an invalid port") from None
    host = parts.hostname
    if not host:
        raise FetchError(f"{public_url(url)} has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _vetted_addresses(target: _Target, url: str, policy: FetchPolicy) -> list[tuple]:
    """Resolve the host; refuse it if ANY address is forbidden (an attacker controls which one we try).

    Resolution is bounded by the system resolver's own timeouts, not by the fetch deadline.
    """
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchError(f"{public_url(url)}: the host name does not resolve") from None
    trusted = target.host.lower() in policy.allowed_hosts
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address in METADATA_ADDRESSES or (not trusted and is_forbidden_address(address)):
            raise FetchError(
                f"{public_url(url)} resolves to a private, loopback or otherwise non-public address, "
                "which is not allowed"
            )
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"{public_url(url)} timed out")
    return left


def _connect(addresses: list[tuple], deadline: float, url: str) -> socket.socket:
    last_error: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline, url))
            sock.connect(sockaddr)
            return sock
        except OSError as error:
            sock.close()
            last_error = error
        except FetchError:
            sock.close()
            raise
    if isinstance(last_error, TimeoutError):
        raise FetchError(f"{public_url(url)} timed out")
    raise FetchError(f"{public_url(url)}: could not connect ({type(last_error).__name__})")


@contextmanager
def _watchdog(sock: socket.socket, deadline: float) -> Iterator[None]:
    """Shut the connection down at the deadline, whatever it is blocked on (connect aside).

    Per-call socket timeouts alone let a server that trickles one byte a second run forever; shutting the
    connection down bounds the fetch as a whole. The shutdown goes through a duplicate descriptor of our own:
    TLS wrapping detaches the original socket object, and a descriptor we hold cannot be reused by anyone else
    before the timer is stopped.
    """
    twin = sock.dup()

    def expire() -> None:
        with suppress(OSError):
            twin.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        twin.close()


def _open(target: _Target, sock: socket.socket, policy: FetchPolicy) -> http.client.HTTPConnection:
    if target.scheme == "https":
        context = ssl.create_default_context(cafile=policy.ca_file)
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, context=context
        )
        connection.sock = context.wrap_socket(sock, server_hostname=target.host)
    else:
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = sock
    return connection


def _get_once(url: str, policy: FetchPolicy, deadline: float) -> bytes | str:
    """One request: the body as a result, or the next URL when the server redirects."""
    target = _parse(url, policy)
    addresses = _vetted_addresses(target, url, policy)
    sock = _connect(addresses, deadline, url)
    connection: http.client.HTTPConnection | None = None
    try:
        with _watchdog(sock, deadline):
            connection = _open(target, sock, policy)
            connection.request("GET", target.path, headers={"Accept": "*/*", "User-Agent": "higgs-worker"})
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{public_url(url)} redirected without a Location header")
                return urljoin(url, location)
            if response.status != 200:
                raise FetchError(f"{public_url(url)} answered HTTP {response.status}", status=response.status)
            data = _read_capped(response, policy.max_bytes, url)
        if time.monotonic() >= deadline:
            raise TimeoutError  # the watchdog cut the body short; what we hold may be incomplete
        return data
    except ssl.SSLCertVerificationError:
        raise FetchError(f"{public_url(url)}: the TLS certificate could not be verified") from None
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline:
            raise FetchError(f"{public_url(url)} timed out after {policy.timeout_s:g} s") from None
        raise FetchError(f"{public_url(url)}: the connection failed ({type(error).__name__})") from None
    finally:
        if connection is not None:
            connection.close()
        sock.close()


def _read_capped(response: http.client.HTTPResponse, max_bytes: int, url: str) -> bytes:
    too_large = f"{public_url(url)} is larger than the limit of {max_bytes} bytes"
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchError(too_large)
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read1(READ_CHUNK_BYTES)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(too_large)
        chunks.append(chunk)
    if declared is not None and declared.strip().isdigit() and total < int(declared):
        raise FetchError(f"{public_url(url)}: the body ended early ({total} of {declared} bytes)")
    return b"".join(chunks)
