"""Every setting the worker reads from its environment, in one typed place.

Why one place: RunPod endpoints are configured only through environment variables, so a typo or a bad value
must fail at start-up with the variable's name, not deep inside a job. Nothing else in the worker reads
``os.environ`` for its own configuration (the AWS SDK and huggingface_hub read their own variables).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from higgs_worker.delivery import MAX_PRESIGN_EXPIRY_S, OUTPUT_OVERHEAD_BYTES, validate_bucket_name
from higgs_worker.errors import SettingsError

DEFAULT_MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
DEFAULT_TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"
# The revisions every deployment loads unless MODEL_REVISION / TOKENIZER_REVISION say otherwise. The one place
# to pin them: deploy/endpoint.json, .runpod/hub.json and the README must carry the same values (a test keeps
# them in step). A branch follows the repository, a 40-hex commit freezes it; the bosonai repositories were
# converted in place to the transformers format in April 2026, so a pin must name a commit after that.
DEFAULT_MODEL_REVISION = "main"
DEFAULT_TOKENIZER_REVISION = "main"
# The quality models (higgs_worker/quality): fetched to the volume on first use, like the speech model.
DEFAULT_ALIGNER_REPO = "facebook/wav2vec2-base-960h"  # English CTC, 95M parameters: word timestamps
DEFAULT_ALIGNER_REVISION = "main"
DEFAULT_RECOGNISER_REPO = "openai/whisper-large-v3-turbo"  # multilingual, 809M parameters: verification
DEFAULT_RECOGNISER_REVISION = "main"
DEFAULT_VOICES_BASE_URL = "https://raw.githubusercontent.com/boson-ai/higgs-audio/main/examples/voice_prompts"
RUNPOD_VOLUME = Path("/runpod-volume")
ENDPOINT_TYPES = ("QUEUE", "LOAD_BALANCER")  # RunPod's own names for the two kinds of serverless endpoint
MOST_SIZED_SLOTS = 64  # beyond this a step's sampling and publishing, not memory, limit what a GPU gives


@dataclass(frozen=True)
class Settings:
    volume_path: Path
    model_repo: str
    model_revision: str
    model_path: Path
    tokenizer_repo: str
    tokenizer_revision: str
    tokenizer_path: Path
    hf_cache_hub_dir: Path
    download_lock_stale_s: float  # a download lock without a heartbeat this long has a dead holder
    preload_models: bool
    demo_model: bool  # serve the tiny demo checkpoint built here (bootstrap.sh --demo), not the hub's
    device: str
    voices_dir: Path
    voices_base_url: str
    allow_http_reference: bool
    max_transcript_chars: int
    max_new_tokens_limit: int
    max_reference_bytes: int
    max_reference_seconds: float
    reference_fetch_timeout_s: float
    reference_allowed_hosts: frozenset[str]
    s3_default_bucket: str | None
    s3_presign_expiry_s: int
    max_inline_bytes: int
    result_cache: bool
    result_cache_dir: Path
    cache_max_bytes: int
    streaming: bool
    concurrency: int
    longform_chunk_chars: int
    generation_backend: str  # "scheduler" (continuous batching) or "transformers" (its generate(), reference)
    scheduler_slots: int  # sequences decoded together; each holds max_sequence_tokens of KV cache
    # Neither CONCURRENCY nor SCHEDULER_SLOTS set: on a GPU both are sized from its free memory, up to this
    # many (the doors' thread pools are made for it); None: they are as set (or 8 off a GPU).
    size_slots_up_to: int | None
    max_sequence_tokens: int  # prompt (reference audio included) plus max_new_tokens, per sequence
    cuda_graphs: bool | None  # None: on when generating on CUDA
    compile_step: bool  # the decode step through torch.compile (boson_multimodal/decode_step.py)
    prefill_together: bool | None  # None: on when generating on CUDA (boson_multimodal/prefill.py)
    endpoint_type: str  # QUEUE: the runpod SDK's worker loop; LOAD_BALANCER: the HTTP server
    http_host: str
    port: int
    port_health: int  # the port of the health route; the same as ``port`` unless RunPod is told otherwise
    health_path: str  # the route RunPod's load balancer polls (HEALTH_CHECK_PATH, /ping by default)
    max_request_bytes: int  # an HTTP request body over this is refused before it is read whole
    aligner_repo: str
    aligner_revision: str
    aligner_path: Path
    recogniser_repo: str
    recogniser_revision: str
    recogniser_path: Path

    @property
    def lock_dir(self) -> Path:
        return self.volume_path / ".locks"

    @property
    def most_concurrent(self) -> int:
        """The most jobs this worker may take at once: CONCURRENCY, or the most that sizing may choose."""
        return self.size_slots_up_to or self.concurrency

    @property
    def saved_voices_dir(self) -> Path:
        """Voices saved through the library: a folder of their own, so no preset file is ever theirs."""
        return self.voices_dir / "saved"


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean; use true or false")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _int_at_most(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    value = _int(env, name, default, minimum)
    if value > maximum:
        raise SettingsError(f"{name}={value} must be at most {maximum}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default, minimum=1)
    if value > 65535:
        raise SettingsError(f"{name}={value} is not a TCP port; use 1 to 65535")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _str(env, name, default)
    if value not in allowed:
        raise SettingsError(f"{name}={value!r} is not allowed; use one of {', '.join(allowed)}")
    return value


def _bucket(env: Mapping[str, str], name: str) -> str | None:
    """A bucket name is checked here, at start-up: a typo must stop the worker, not fail every job."""
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return validate_bucket_name(value)
    except ValueError as error:
        raise SettingsError(f"{name}: {error}") from None


def _base_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _str(env, name, default).rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(f"{name}={value!r} is not an http(s) URL")
    return value


def _path_of_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _str(env, name, default)
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
        raise SettingsError(f"{name}={value!r} is not a URL path such as /ping")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def default_volume_path(env: Mapping[str, str]) -> Path:
    """The network volume when RunPod mounted one, else a local directory beside the working tree."""
    explicit = env.get("RUNPOD_VOLUME_PATH", "").strip()
    if explicit:
        return Path(explicit)
    return RUNPOD_VOLUME if RUNPOD_VOLUME.is_dir() else Path(".volume").resolve()


def _repo_dir(volume: Path, repo_id: str) -> Path:
    return volume / repo_id


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    volume = default_volume_path(env)
    model_repo = _str(env, "MODEL_REPO", DEFAULT_MODEL_REPO)
    tokenizer_repo = _str(env, "TOKENIZER_REPO", DEFAULT_TOKENIZER_REPO)
    aligner_repo = _str(env, "ALIGNER_REPO", DEFAULT_ALIGNER_REPO)
    recogniser_repo = _str(env, "RECOGNISER_REPO", DEFAULT_RECOGNISER_REPO)
    port = _port(env, "PORT", 80)
    device = _str(env, "DEVICE", "auto")
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise SettingsError(f"DEVICE={device!r} is not allowed; use auto, cpu, cuda or cuda:N")
    concurrency = _int(env, "CONCURRENCY", 8, minimum=1)
    slots = _int(env, "SCHEDULER_SLOTS", concurrency, minimum=1)  # by default one per job in flight
    chosen = any(_str(env, name, "") for name in ("CONCURRENCY", "SCHEDULER_SLOTS"))
    max_new_tokens_limit = _int(env, "MAX_NEW_TOKENS_LIMIT", 4096, minimum=16)
    max_sequence_tokens = _int(env, "MAX_SEQUENCE_TOKENS", 6144, minimum=64)
    if max_sequence_tokens <= max_new_tokens_limit:
        raise SettingsError(
            f"MAX_SEQUENCE_TOKENS={max_sequence_tokens} leaves no room for the prompt next to "
            f"MAX_NEW_TOKENS_LIMIT={max_new_tokens_limit}; make it larger (each second of reference audio "
            "takes about 25 tokens) or lower MAX_NEW_TOKENS_LIMIT"
        )
    graphs = _choice(env, "CUDA_GRAPHS", "auto", ("auto", "true", "false"))
    together = _choice(env, "PREFILL_TOGETHER", "auto", ("auto", "true", "false"))
    return Settings(
        volume_path=volume,
        model_repo=model_repo,
        model_revision=_str(env, "MODEL_REVISION", DEFAULT_MODEL_REVISION),
        model_path=Path(_str(env, "MODEL_PATH", str(_repo_dir(volume, model_repo)))),
        tokenizer_repo=tokenizer_repo,
        tokenizer_revision=_str(env, "TOKENIZER_REVISION", DEFAULT_TOKENIZER_REVISION),
        tokenizer_path=Path(_str(env, "TOKENIZER_PATH", str(_repo_dir(volume, tokenizer_repo)))),
        hf_cache_hub_dir=Path(_str(env, "RUNPOD_HF_CACHE_DIR", str(volume / "huggingface-cache" / "hub"))),
        download_lock_stale_s=_float(env, "DOWNLOAD_LOCK_STALE_S", 60.0, minimum=1.0),
        preload_models=_bool(env, "PRELOAD_MODELS", False),
        demo_model=_bool(env, "DEMO_MODEL", False),
        device=device,
        voices_dir=Path(_str(env, "VOICES_DIR", str(volume / "voices"))),
        voices_base_url=_base_url(env, "VOICES_BASE_URL", DEFAULT_VOICES_BASE_URL),
        allow_http_reference=_bool(env, "ALLOW_HTTP_REFERENCE", False),
        max_transcript_chars=_int(env, "MAX_TRANSCRIPT_CHARS", 20_000, minimum=1),
        max_new_tokens_limit=max_new_tokens_limit,
        max_reference_bytes=_int(env, "MAX_REFERENCE_BYTES", 10 * 1024 * 1024, minimum=1024),
        max_reference_seconds=_float(env, "MAX_REFERENCE_SECONDS", 60.0, minimum=1.0),
        reference_fetch_timeout_s=_float(env, "REFERENCE_FETCH_TIMEOUT_S", 20.0, minimum=1.0),
        reference_allowed_hosts=frozenset(
            host.strip().lower() for host in env.get("REFERENCE_ALLOWED_HOSTS", "").split(",") if host.strip()
        ),
        s3_default_bucket=_bucket(env, "S3_BUCKET"),
        s3_presign_expiry_s=_int_at_most(env, "S3_PRESIGN_EXPIRY_S", 3600, 1, MAX_PRESIGN_EXPIRY_S),
        # The result carries a few KB of fields beside the audio: a limit below that could carry no audio.
        max_inline_bytes=_int(env, "MAX_INLINE_BYTES", 9 * 1024 * 1024, minimum=2 * OUTPUT_OVERHEAD_BYTES),
        result_cache=_bool(env, "RESULT_CACHE", True),
        result_cache_dir=Path(_str(env, "RESULT_CACHE_DIR", str(volume / "result-cache"))),
        cache_max_bytes=_int(env, "CACHE_MAX_BYTES", 2 * 1024**3, minimum=0),
        streaming=_bool(env, "STREAMING", False),
        concurrency=concurrency,
        longform_chunk_chars=_int(env, "LONGFORM_CHUNK_CHARS", 400, minimum=50),
        generation_backend=_choice(env, "GENERATION_BACKEND", "scheduler", ("scheduler", "transformers")),
        scheduler_slots=slots,
        size_slots_up_to=None if chosen else MOST_SIZED_SLOTS,
        max_sequence_tokens=max_sequence_tokens,
        cuda_graphs=None if graphs == "auto" else graphs == "true",
        compile_step=_bool(env, "COMPILE_STEP", False),
        prefill_together=None if together == "auto" else together == "true",
        endpoint_type=_choice(env, "ENDPOINT_TYPE", "QUEUE", ENDPOINT_TYPES),
        http_host=_str(env, "HTTP_HOST", "0.0.0.0"),
        port=port,
        port_health=_port(env, "PORT_HEALTH", port),
        health_path=_path_of_url(env, "HEALTH_CHECK_PATH", "/ping"),
        max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 30 * 1024 * 1024, minimum=64 * 1024),
        aligner_repo=aligner_repo,
        aligner_revision=_str(env, "ALIGNER_REVISION", DEFAULT_ALIGNER_REVISION),
        aligner_path=Path(_str(env, "ALIGNER_PATH", str(_repo_dir(volume, aligner_repo)))),
        recogniser_repo=recogniser_repo,
        recogniser_revision=_str(env, "RECOGNISER_REVISION", DEFAULT_RECOGNISER_REVISION),
        recogniser_path=Path(_str(env, "RECOGNISER_PATH", str(_repo_dir(volume, recogniser_repo)))),
    )
