"""Getting a generated clip to the user: an S3 upload with a presigned link, or inline base64 in the result.

The rule is that a clip always reaches the user or the user is told why. RunPod silently drops a result
over its payload limit (the client sees COMPLETED with no output), so the inline size is measured here, and a
failed upload falls back to inline whenever the clip fits.

Credentials and the endpoint come only from the environment, read by boto3 itself: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
(honoured by boto3 since 1.28). Addressing: AWS itself gets boto3's default (virtual-hosted); any other
endpoint (R2, MinIO, SeaweedFS, a loopback test server) gets path-style, which all of them serve and which
needs no wildcard DNS.
Error messages carry the S3 error code and message or the connection failure, never credentials or signatures.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from higgs_worker.audio.encoding import FORMATS, EncodedAudio, supported_formats
from higgs_worker.errors import DeliveryError

if TYPE_CHECKING:
    from botocore.config import Config

# boto3 and botocore are imported where audio goes to S3, never at import: they cost about half a second of
# every worker start, before it serves, and a job answered inline never needs them.

log = logging.getLogger(__name__)

KEY_PREFIX = "higgs-audio"
MAX_KEY_BYTES = 1024
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # the SigV4 ceiling; a longer expiry makes S3 reject the link
# Room left in the result for the fields the handler adds beside the audio (format, timings, revisions...).
OUTPUT_OVERHEAD_BYTES = 8 * 1024

_KEY_CHARS = re.compile(r"[A-Za-z0-9/!_.*'()=-]+")
_JOB_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_BUCKET_SHAPE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_SHAPE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True)
class S3Target:
    bucket: str
    key: str


@dataclass(frozen=True)
class DeliveryPolicy:
    """How a clip may be returned: ``max_inline_bytes`` bounds the whole JSON result RunPod will accept.

    ``delivered_inline``: the client already holds the audio inline (a stream's chunks), so a failed upload
    is reported, never answered with a second inline copy.
    """

    max_inline_bytes: int
    presign_expiry_s: int
    inline_requested: bool
    delivered_inline: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.presign_expiry_s <= MAX_PRESIGN_EXPIRY_S:
            raise ValueError(
                f"presign_expiry_s {self.presign_expiry_s} is out of range; use 1 to {MAX_PRESIGN_EXPIRY_S}"
            )


class InlineBudget:
    """The base64 bytes one job's result may still carry: the one owner of RunPod's result-size limit.

    Why one object per job: a streaming job's result is the aggregate of all its chunks (``/run`` and
    ``/runsync`` return them together), so the chunks, the final clip and the fallback after a failed upload
    all draw on the same budget; checking each against the whole limit would let their sum pass it.
    """

    def __init__(self, max_inline_bytes: int) -> None:
        self.limit = max_inline_bytes
        self.left = max_inline_bytes - OUTPUT_OVERHEAD_BYTES  # room for the fields beside the audio

    def spend(self, size: int) -> bool:
        """Take ``size`` bytes if they fit; False (and nothing taken) if not."""
        if size > self.left:
            return False
        self.left -= size
        return True


S3ClientFactory = Callable[[], Any]


def default_s3_key(job_id: str, fmt: str, now: datetime | None = None) -> str:
    """``higgs-audio/YYYY/MM/DD/<job_id>.<fmt>``: dated prefixes keep listings and lifecycle rules cheap."""
    if fmt not in FORMATS:
        raise ValueError(f"output_format '{fmt}' is not supported; use one of: {supported_formats()}")
    day = (now or datetime.now(UTC)).strftime("%Y/%m/%d")
    safe_id = _JOB_ID_UNSAFE.sub("-", job_id).strip(".-") or "job"
    return f"{KEY_PREFIX}/{day}/{safe_id}.{fmt}"


def validate_s3_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise ``ValueError`` saying what is allowed.

    Only AWS's "safe" characters are accepted: they need no URL or XML escaping anywhere, and the ban on
    ``..`` and a leading ``/`` keeps keys from reading as paths on gateways that map keys to files.
    """
    if not key:
        raise ValueError("s3_key is empty; give an object key such as 'audio/clip.wav'")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"s3_key is {len(key.encode())} bytes long; the limit is {MAX_KEY_BYTES}")
    if not _KEY_CHARS.fullmatch(key):
        raise ValueError(
            "s3_key may contain only letters, digits, '/', and ! - _ . * ' ( ) = "
            "(no spaces or control characters)"
        )
    if key.startswith("/") or key.endswith("/"):
        raise ValueError("s3_key must not start or end with '/'")
    if ".." in key:
        raise ValueError("s3_key must not contain '..'")
    if "." in key.split("/"):
        # URLs normalise a "." segment away (RFC 3986), so S3 servers refuse such a key rather than store it.
        raise ValueError("s3_key must not have a path segment that is just '.'")
    if "//" in key:
        raise ValueError("s3_key must not contain an empty path segment ('//')")
    return key


def validate_bucket_name(bucket: str) -> str:
    """Return ``bucket`` if it follows S3's naming rules, else raise ``ValueError`` saying what is allowed."""
    rules = (
        "s3_bucket must be 3-63 characters of lowercase letters, digits, '.' and '-', "
        "starting and ending with a letter or digit"
    )
    if not _BUCKET_SHAPE.fullmatch(bucket):
        raise ValueError(f"{rules}; got {bucket!r}")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise ValueError(f"s3_bucket {bucket!r} has adjacent '.'/'-' characters; {rules}")
    if _IPV4_SHAPE.fullmatch(bucket):
        raise ValueError(f"s3_bucket {bucket!r} looks like an IP address, which S3 does not allow")
    if bucket.startswith(_RESERVED_BUCKET_PREFIXES) or bucket.endswith(_RESERVED_BUCKET_SUFFIXES):
        raise ValueError(f"s3_bucket {bucket!r} uses a prefix or suffix that S3 reserves")
    return bucket


def _client_config(addressing_style: str | None) -> Config:
    from botocore.config import Config

    # A dead endpoint must fail within seconds so the inline fallback still lands inside the job's time.
    return Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": addressing_style} if addressing_style else None,
    )


def _is_aws_endpoint(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def default_s3_client() -> Any:
    """A boto3 S3 client configured from the environment, path-style for any non-AWS endpoint."""
    import boto3

    session = boto3.session.Session()
    client = session.client("s3", config=_client_config(None))
    if _is_aws_endpoint(client.meta.endpoint_url):
        return client
    return session.client("s3", config=_client_config("path"))


def describe_s3_failure(exc: Exception) -> str:
    """The cause of a failed S3 call in words, without credentials, signatures or request headers.

    Only the error code and message of an S3 answer are used: the rest of it (``StringToSign``,
    ``CanonicalRequest``, ``AWSAccessKeyId`` on a signature mismatch) describes the caller's credentials.
    """
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "error"
        message = error.get("Message") or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        status_text = f" (HTTP {status})" if status else ""
        return f"{code}{status_text}: {message}".rstrip(": ")
    return str(exc) or type(exc).__name__


def _inline_part(audio: EncodedAudio) -> dict[str, str]:
    return {"audio_base64": base64.b64encode(audio.data).decode("ascii")}


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.2f} MB"


def _too_big_message(size: int, limit: int) -> str:
    return (
        f"the audio is {_mb(size)}, over the {_mb(limit)} inline result limit (RunPod drops larger results)"
    )


def _upload(audio: EncodedAudio, target: S3Target, policy: DeliveryPolicy, client: Any) -> dict[str, str]:
    client.put_object(Bucket=target.bucket, Key=target.key, Body=audio.data, ContentType=audio.mimetype)
    url = client.generate_presigned_url(
        "get_object",
        Params={"Bucket": target.bucket, "Key": target.key},
        ExpiresIn=policy.presign_expiry_s,
    )
    return {
        "bucket": target.bucket,
        "key": target.key,
        "uri": f"s3://{target.bucket}/{target.key}",
        "url": url,
    }


def deliver(
    audio: EncodedAudio,
    target: S3Target | None,
    policy: DeliveryPolicy,
    *,
    budget: InlineBudget | None = None,
    s3_client_factory: S3ClientFactory = default_s3_client,
) -> dict[str, Any]:
    """Return the part of the job output that says where the audio is.

    With a target: ``{"s3": {bucket, key, uri, url}}`` plus ``audio_base64`` if inline was requested and fits
    (else ``inline_error`` says why it is missing). If the upload fails: the audio inline with ``s3_error``,
    or ``DeliveryError`` naming the bucket when it does not fit (only ``s3_error`` when the client already
    holds the audio). Without a target: inline, or ``DeliveryError`` explaining the limit and the way out.
    ``budget`` is the job's inline budget (a fresh one of ``policy.max_inline_bytes`` when not given).
    """
    budget = budget or InlineBudget(policy.max_inline_bytes)
    inline = _inline_part(audio)
    size, room = len(json.dumps(inline)), budget.left
    if target is None:
        if budget.spend(size):
            return inline
        raise DeliveryError(
            f"{_too_big_message(size, room)}; set s3_bucket (and AWS credentials) "
            "or use a compressed output_format such as mp3 or opus"
        )
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_part = _upload(audio, target, policy, s3_client_factory())
    # ValueError: botocore rejects a malformed endpoint URL when the client is built.
    except (BotoCoreError, ClientError, ValueError) as exc:
        cause = describe_s3_failure(exc)
        log.warning("S3 upload to bucket %r failed: %s", target.bucket, cause)
        s3_error = {"s3_error": f"upload to bucket '{target.bucket}' failed: {cause}"}
        if policy.delivered_inline:
            return s3_error
        if budget.spend(size):
            return {**inline, **s3_error}
        raise DeliveryError(
            f"upload to bucket '{target.bucket}' failed: {cause}; "
            f"and {_too_big_message(size, room)}, so it cannot be returned inline either"
        ) from None
    result: dict[str, Any] = {"s3": s3_part}
    if policy.inline_requested:
        if budget.spend(size):
            result.update(inline)
        else:
            result["inline_error"] = f"{_too_big_message(size, room)}; it is in S3 only"
    return result
