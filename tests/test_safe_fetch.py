"""The SSRF-safe fetcher against real loopback HTTP(S) servers: what it refuses, what it still does right."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from higgs_worker.errors import FetchError
from higgs_worker.voices.safe_fetch import FetchPolicy, fetch, is_forbidden_address, public_url
from tests.support.loopback_http import (
    LoopbackServer,
    TlsFiles,
    make_tls_files,
    send_body,
    send_declared_length,
    send_redirect,
    send_status,
    send_trickle,
)

LIMIT = 64 * 1024
PAYLOAD = bytes(range(256)) * 40  # 10 KiB, every byte value


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tls: TlsFiles) -> Iterator[LoopbackServer]:
    routes = {
        "/file": send_body(PAYLOAD),
        "/unsized": send_body(PAYLOAD, with_length=False),
        "/huge": send_body(b"\0" * (LIMIT + 1)),
        "/huge-unsized": send_body(b"\0" * (LIMIT + 1), with_length=False),
        "/claims-huge": send_declared_length(LIMIT * 1000),
        "/missing": send_status(404),
        "/broken": send_status(500),
        "/slow-body": send_trickle(headers_first=True),
        "/slow-headers": send_trickle(headers_first=False),
        "/loop": send_redirect("/loop"),
        "/to-file": send_redirect("/file", status=301),
    }
    with LoopbackServer(routes, tls).running() as running:
        yield running


def policy(tls: TlsFiles, **changes: object) -> FetchPolicy:
    """The policy a job URL gets, trusting the test CA and (unless changed) the host name ``localhost``."""
    values: dict = {
        "max_bytes": LIMIT,
        "timeout_s": 5.0,
        "allowed_hosts": frozenset({"localhost"}),
        "ca_file": str(tls.ca_file),
    }
    values.update(changes)
    return FetchPolicy(**values)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.170.2",
        "100.100.100.200",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_allowed_host_over_https_returns_the_exact_body_and_sends_the_real_host_name(
    server: LoopbackServer, tls: TlsFiles
) -> None:
    assert fetch(server.url("/file?sig=abc", host="localhost"), policy(tls)) == PAYLOAD
    # Connected to the vetted address, but Host (and SNI: the certificate is valid for "localhost" only) name
    # the host from the URL.
    assert server.requests == [("/file?sig=abc", f"localhost:{server.port}")]


def test_body_without_content_length_is_read_to_the_end(server: LoopbackServer, tls: TlsFiles) -> None:
    assert fetch(server.url("/unsized", host="localhost"), policy(tls)) == PAYLOAD


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:{port}/file",  # a host name resolving to loopback
        "https://127.0.0.1:{port}/file",
        "https://2130706433:{port}/file",  # 127.0.0.1 written as one decimal number
        "https://0x7f.1:{port}/file",
        "https://[::1]:{port}/file",
        "https://[::ffff:127.0.0.1]:{port}/file",
        "https://10.0.0.1/file",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fd00:ec2::254]/latest/meta-data/",
    ],
)
def test_private_and_loopback_destinations_are_refused_before_any_request(
    server: LoopbackServer, tls: TlsFiles, url: str
) -> None:
    with pytest.raises(FetchError, match="non-public address"):
        fetch(url.format(port=server.port), policy(tls, allowed_hosts=frozenset()))
    assert server.requests == []


def test_metadata_address_is_refused_even_for_an_allowed_host(tls: TlsFiles) -> None:
    with pytest.raises(FetchError, match="non-public address"):
        fetch("https://169.254.169.254/latest/", policy(tls, allowed_hosts=frozenset({"169.254.169.254"})))


def test_tls_is_verified_against_the_trusted_cas(server: LoopbackServer, tls: TlsFiles) -> None:
    with pytest.raises(FetchError, match="certificate could not be verified"):
        fetch(server.url("/file", host="localhost"), policy(tls, ca_file=None))


def test_tls_host_name_is_checked(server: LoopbackServer, tls: TlsFiles) -> None:
    # The certificate names "localhost"; reaching the same server as 127.0.0.1 must fail verification.
    allowed = frozenset({"127.0.0.1"})
    with pytest.raises(FetchError, match="certificate could not be verified"):
        fetch(server.url("/file"), policy(tls, allowed_hosts=allowed))


def test_http_is_refused_unless_allowed(tls: TlsFiles) -> None:
    with LoopbackServer({"/file": send_body(PAYLOAD)}).running() as plain:
        with pytest.raises(FetchError, match=r"scheme that is not allowed; use https://"):
            fetch(plain.url("/file", host="localhost"), policy(tls))
        assert plain.requests == []
        allowed = policy(tls, allowed_schemes=frozenset({"http", "https"}))
        assert fetch(plain.url("/file", host="localhost"), allowed) == PAYLOAD


@pytest.mark.parametrize("url", ["ftp://example.com/a.wav", "file:///etc/passwd", "gopher://x/"])
def test_other_schemes_are_refused(tls: TlsFiles, url: str) -> None:
    with pytest.raises(FetchError, match="scheme that is not allowed"):
        fetch(url, policy(tls))


def test_redirect_within_the_allowed_host_is_followed(server: LoopbackServer, tls: TlsFiles) -> None:
    assert fetch(server.url("/to-file", host="localhost"), policy(tls)) == PAYLOAD
    assert [path for path, _ in server.requests] == ["/to-file", "/file"]


@pytest.mark.parametrize(
    "target",
    ["https://127.0.0.1:{port}/file", "https://169.254.169.254/latest/meta-data/", "https://10.1.2.3/x"],
)
def test_redirect_to_a_private_address_is_refused(server: LoopbackServer, tls: TlsFiles, target: str) -> None:
    server.routes["/escape"] = send_redirect(target.format(port=server.port))
    with pytest.raises(FetchError, match="non-public address"):
        fetch(server.url("/escape", host="localhost"), policy(tls))
    assert [path for path, _ in server.requests] == ["/escape"]


def test_redirect_to_plain_http_is_refused(server: LoopbackServer, tls: TlsFiles) -> None:
    server.routes["/downgrade"] = send_redirect(f"http://localhost:{server.port}/file")
    with pytest.raises(FetchError, match="scheme that is not allowed"):
        fetch(server.url("/downgrade", host="localhost"), policy(tls))


def test_redirect_loops_stop(server: LoopbackServer, tls: TlsFiles) -> None:
    with pytest.raises(FetchError, match="redirected more than 3 times"):
        fetch(server.url("/loop", host="localhost"), policy(tls, max_redirects=3))
    assert len(server.requests) == 4


@pytest.mark.parametrize("path", ["/huge", "/huge-unsized", "/claims-huge"])
def test_bodies_over_the_limit_are_refused(server: LoopbackServer, tls: TlsFiles, path: str) -> None:
    with pytest.raises(FetchError, match=f"larger than the limit of {LIMIT} bytes"):
        fetch(server.url(path, host="localhost"), policy(tls))


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_a_trickling_server_hits_the_overall_timeout(
    server: LoopbackServer, tls: TlsFiles, path: str
) -> None:
    # Each byte arrives well within any per-read timeout; only a deadline for the whole fetch stops it.
    with pytest.raises(FetchError, match="timed out after 1 s"):
        fetch(server.url(path, host="localhost"), policy(tls, timeout_s=1.0))


def test_error_statuses_are_reported_with_the_status(server: LoopbackServer, tls: TlsFiles) -> None:
    with pytest.raises(FetchError, match="answered HTTP 404") as missing:
        fetch(server.url("/missing", host="localhost"), policy(tls))
    assert missing.value.status == 404
    with pytest.raises(FetchError, match="answered HTTP 500") as broken:
        fetch(server.url("/broken", host="localhost"), policy(tls))
    assert broken.value.status == 500


def test_unresolvable_host_is_reported(tls: TlsFiles) -> None:
    with pytest.raises(FetchError, match="does not resolve"):
        fetch("https://no-such-host.invalid/a.wav", policy(tls))


def test_errors_never_repeat_credentials_or_query_strings(server: LoopbackServer, tls: TlsFiles) -> None:
    url = f"https://user:hunter2@127.0.0.1:{server.port}/voice.wav?X-Amz-Signature=s3cr3t#frag"
    with pytest.raises(FetchError) as refused:
        fetch(url, policy(tls, allowed_hosts=frozenset()))
    message = str(refused.value)
    assert f"https://127.0.0.1:{server.port}/voice.wav" in message
    assert "hunter2" not in message
    assert "s3cr3t" not in message
    assert "user" not in message


def test_public_url_keeps_scheme_host_port_and_path_only() -> None:
    assert public_url("https://u:p@Example.com:8443/a/b.wav?token=x#f") == "https://example.com:8443/a/b.wav"
    assert public_url("https://[::1]/x?y") == "https://[::1]/x"
