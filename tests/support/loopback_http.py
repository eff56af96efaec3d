"""Real HTTP(S) servers on 127.0.0.1 for tests that fetch over the network, and a throwaway CA.

Why real servers: the fetcher's job is to refuse addresses, pin connections, verify TLS and cap size and time;
only real sockets show it does. Each route is a small function that writes the response by hand, so a test can
serve exactly the misbehaviour it needs (no Content-Length, a redirect, a trickle).
"""

from __future__ import annotations

import datetime
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # the CA certificate a client must trust
    cert_file: Path  # the server certificate, valid for the DNS name "localhost" only
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for ``localhost`` (no IP SAN: connecting as 127.0.0.1 must fail TLS)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "higgs-worker test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


class LoopbackServer:
    """A threaded HTTP(S) server on 127.0.0.1 that records every request (path and Host header)."""

    def __init__(self, routes: dict[str, Route], tls: TlsFiles | None = None) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Host")))
                route = server.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    send_status(404)(self)
                else:
                    route(self)

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.port = self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}{path}"

    @contextmanager
    def running(self) -> Iterator[LoopbackServer]:
        thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join()


def send_body(
    data: bytes, content_type: str = "application/octet-stream", *, with_length: bool = True
) -> Route:
    """A 200 answer; without a length the body ends when the connection closes."""

    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", content_type)
        if with_length:
            request.send_header("Content-Length", str(len(data)))
        else:
            request.send_header("Connection", "close")
            request.close_connection = True
        request.end_headers()
        with suppress(OSError):
            request.wfile.write(data)

    return route


def send_status(status: int) -> Route:
    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return route


def send_redirect(location: str, status: int = 302) -> Route:
    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return route


def send_declared_length(declared: int) -> Route:
    """Claims a huge body and sends a little: the client must refuse on the header alone."""

    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(declared))
        request.end_headers()
        with suppress(OSError):
            request.wfile.write(b"\0" * 1024)

    return route


def send_trickle(interval_s: float = 0.1, total_s: float = 10.0, *, headers_first: bool = True) -> Route:
    """A server that is alive but slow: one byte per interval (after or before the headers)."""

    def route(request: BaseHTTPRequestHandler) -> None:
        with suppress(OSError):
            if headers_first:
                request.send_response(200)
                request.send_header("Connection", "close")
                request.end_headers()
                request.close_connection = True
            else:
                request.wfile.write(b"HTTP/1.1 200 OK\r\n")
            stop = time.monotonic() + total_s
            while time.monotonic() < stop:
                request.wfile.write(b"x" if headers_first else b"X-Slow: 1\r\n")
                request.wfile.flush()
                time.sleep(interval_s)

    return route
