"""Turn a job's voice value into a voice: audio (a preset, a data URI, a URL) or words (a profile).

Why one module: every form ends the same way (decoded mono audio, capped in size and length, with its
transcript; or a description in words), and each has its own way to go wrong that the user must be told
about by field name. Preset voices live on the volume as ``<name>.wav`` + ``<name>.txt``; the first worker to
need one fetches it from the operator's ``voices_base_url`` (upstream Higgs Audio's ``examples/voice_prompts``
by default) and publishes it atomically, so every later job, on any worker sharing the volume, reads it
without touching the network. Profiles (``profile:<name>``, the upstream script's described voices) come
from ``profile.yaml`` in the same place and are cached the same way. OpenAI's voice names map to presets
or profiles (:data:`OPENAI_VOICES`) and never fail: when the voice they map to cannot be had, their own
description stands in. URLs from jobs go through :mod:`higgs_worker.voices.safe_fetch`, which keeps them
out of private networks.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
import yaml

from higgs_worker.audio.encoding import decode_audio
from higgs_worker.errors import (
    AudioDecodeError,
    FetchError,
    InvalidVoiceValue,
    ReferenceAudioError,
    UnknownVoiceError,
    WorkerError,
)
from higgs_worker.settings import Settings
from higgs_worker.store.atomic_file import publish
from higgs_worker.voices.safe_fetch import FetchPolicy, fetch, public_url

logger = logging.getLogger(__name__)

# fullmatch, not "$": "$" also matches before a trailing newline.
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Base64 only: percent-encoded audio would be larger and no client sends it. application/octet-stream is
# accepted because browsers and HTTP libraries label files of unknown type that way; the bytes must decode as
# audio either way. Parameters such as ";codecs=opus" (MediaRecorder's "audio/webm;codecs=opus") are allowed.
DATA_URI = re.compile(
    r"data:(?P<mime>audio/[a-z0-9.+-]+|application/octet-stream)(?:;[a-z0-9.+-]+=[a-z0-9.+-]+)*;base64,",
    re.IGNORECASE,
)
ALLOWED_FORMS = (
    "a preset voice name such as 'en_woman', 'profile:<name>' (a described voice such as "
    "'profile:male_en_british'), an OpenAI voice name such as 'alloy', a "
    "'data:audio/<type>;base64,<payload>' URI, or an https:// URL"
)
PROFILE_PREFIX = "profile:"
PROFILES_FILE = "profile.yaml"


@dataclass(frozen=True)
class OpenAIVoice:
    """What one of OpenAI's voice names gives: a preset or ``profile:<name>``, and words to use without it."""

    target: str
    fallback: str


# One table, documented in the README. Presets clone upstream's example voices; profiles describe a voice.
OPENAI_VOICES: dict[str, OpenAIVoice] = {
    "alloy": OpenAIVoice("en_woman", "A clear female voice with a neutral American accent, at an even pace."),
    "ash": OpenAIVoice("en_man", "A clear male voice with a neutral American accent, at an even pace."),
    "ballad": OpenAIVoice("profile:male_en", "A friendly American male voice, moderate pitch, clear audio."),
    "coral": OpenAIVoice("belinda", "A warm, cheerful female voice, lively and expressive, clear audio."),
    "echo": OpenAIVoice("chadwick", "An animated male voice with a playful, theatrical tone, clear audio."),
    "fable": OpenAIVoice(
        "profile:male_en_british", "A male voice with a British accent, conversational and articulate."
    ),
    "nova": OpenAIVoice(
        "profile:female_en_story", "A calm, gentle female storyteller at a measured pace, very clear audio."
    ),
    "onyx": OpenAIVoice("broom_salesman", "A deep, measured male voice with a calm, confident delivery."),
    "sage": OpenAIVoice(
        "profile:female_en_british", "A female voice with a British accent, expressive and friendly."
    ),
    "shimmer": OpenAIVoice("belinda", "A bright, cheerful female voice, lively and expressive, clear audio."),
    "verse": OpenAIVoice("en_man", "A clear, steady male voice at an even pace, very clear audio."),
}
LISTED_PRESETS = 20
MIN_REFERENCE_SECONDS = 0.5


@dataclass(frozen=True)
class ReferenceAudio:
    waveform: np.ndarray  # float32 mono, at the file's own rate
    sample_rate: int
    text: str | None  # transcript of the reference audio, when known
    description: str  # where it came from, safe to log and to show the user
    kind: Literal["reference", "preset", "saved"] = "reference"


@dataclass(frozen=True)
class DescribedVoice:
    """A voice given in words, not audio: the model reads ``text`` in the scene (``SPEAKERi: <text>``)."""

    text: str
    description: str  # where it came from, safe to log and to show the user
    kind: Literal["profile", "description"] = "profile"


ResolvedVoice = ReferenceAudio | DescribedVoice


def resolve_reference(
    value: str, ref_text: str | None, *, field: str, settings: Settings
) -> ReferenceAudio | DescribedVoice:
    """Load the voice named by ``value`` (the job field ``field``).

    ``ref_text`` is the job's transcript of the reference; it is optional (cloning without one works, less
    well). For a preset voice the preset's own transcript is used unless the job gives one.
    """
    if not isinstance(value, str) or not value:
        raise InvalidVoiceValue(f"{field}: must be {ALLOWED_FORMS}")
    if value in OPENAI_VOICES:
        return _from_openai_name(value, ref_text, field, settings)
    if value.startswith(PROFILE_PREFIX):
        return _from_profile(value.removeprefix(PROFILE_PREFIX), field, settings)
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if scheme == "data":
        data = _data_uri_bytes(value, field, settings)
        return _decoded(data, ref_text, "inline data URI", field, settings)
    if scheme in {"http", "https"}:
        return _from_url(value, ref_text, field, settings)
    if PRESET_NAME.fullmatch(value):
        return _from_name(value, ref_text, field, settings)
    raise InvalidVoiceValue(
        f"{field}: {_shown(value)} is not allowed (a preset voice name has only letters, digits, '_' and "
        f"'-', at most 64 characters); use {ALLOWED_FORMS}"
    )


def _shown(value: str) -> str:
    """The value as quoted in an error: short, and without anything after '?' (it may hold a token)."""
    head = value.split("?", 1)[0]
    return repr(head if len(head) <= 80 else head[:77] + "...")


def _decoded(
    data: bytes, text: str | None, description: str, field: str, settings: Settings
) -> ReferenceAudio:
    try:
        waveform, sample_rate = decode_audio(data)
    except AudioDecodeError as error:
        raise ReferenceAudioError(f"{field}: the content of {description} is not audio ({error})") from None
    if waveform.size == 0:
        raise ReferenceAudioError(f"{field}: {description} holds no audio samples")
    seconds = waveform.shape[-1] / sample_rate
    if seconds < MIN_REFERENCE_SECONDS:
        # The codec needs whole 40 ms frames, and a voice needs far more than that to be recognisable.
        raise ReferenceAudioError(
            f"{field}: {description} is {seconds:.3f} s long; "
            f"a reference needs at least {MIN_REFERENCE_SECONDS:g} s"
        )
    if seconds > settings.max_reference_seconds:
        raise ReferenceAudioError(
            f"{field}: {description} is {seconds:.1f} s long; "
            f"the limit is {settings.max_reference_seconds:g} s"
        )
    return ReferenceAudio(waveform, sample_rate, text, description)


def _data_uri_bytes(value: str, field: str, settings: Settings) -> bytes:
    header = DATA_URI.match(value)
    if header is None:
        raise InvalidVoiceValue(
            f"{field}: a data URI must look like 'data:audio/<type>;base64,<payload>' "
            "(or 'data:application/octet-stream;base64,<payload>')"
        )
    payload = value[header.end() :]
    # Every 4 base64 characters carry 3 bytes: refuse before allocating the decoded copy.
    if len(payload) // 4 * 3 > settings.max_reference_bytes:
        raise ReferenceAudioError(
            f"{field}: the data URI's audio is larger than the limit of {settings.max_reference_bytes} bytes"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidVoiceValue(
            f"{field}: the data URI's payload is not valid base64 (standard alphabet, padded, no whitespace)"
        ) from None


def _from_url(url: str, text: str | None, field: str, settings: Settings) -> ReferenceAudio:
    schemes = {"https", "http"} if settings.allow_http_reference else {"https"}
    policy = FetchPolicy(
        max_bytes=settings.max_reference_bytes,
        timeout_s=settings.reference_fetch_timeout_s,
        allowed_schemes=frozenset(schemes),
        allowed_hosts=settings.reference_allowed_hosts,
    )
    try:
        data = fetch(url, policy)
    except FetchError as error:
        raise ReferenceAudioError(f"{field}: {error}") from None
    return _decoded(data, text, public_url(url), field, settings)


def _from_name(name: str, text: str | None, field: str, settings: Settings) -> ReferenceAudio:
    """A voice by name: a saved voice (the library's own folder) first, else a preset.

    Saved voices cannot shadow what this worker already knows by that name: the library refuses OpenAI's
    names, the presets OpenAI's names stand for, and presets on the volume. A name that is neither says so.
    """
    saved = _from_saved(name, text, field, settings)
    if saved is not None:
        return saved
    try:
        return _from_preset(name, text, field, settings)
    except UnknownVoiceError:
        raise UnknownVoiceError(
            f"{field}: no saved voice or preset voice named {name!r}{_available(settings)}"
        ) from None
    except ReferenceAudioError as error:
        reason = str(error).removeprefix(f"{field}: ")
        raise ReferenceAudioError(
            f"{field}: no saved voice named {name!r}, and {reason}{_available(settings)}"
        ) from None


def _from_saved(name: str, text: str | None, field: str, settings: Settings) -> ReferenceAudio | None:
    folder = settings.saved_voices_dir
    try:
        audio = (folder / f"{name}.wav").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if text is None:
        text = _stored_text(folder / f"{name}.txt")
    return replace(_decoded(audio, text, f"saved voice {name!r}", field, settings), kind="saved")


def _from_preset(name: str, text: str | None, field: str, settings: Settings) -> ReferenceAudio:
    voices = settings.voices_dir.resolve()
    wav_path = (voices / f"{name}.wav").resolve()
    txt_path = (voices / f"{name}.txt").resolve()
    # The name pattern already forbids leaving the directory; checking the resolved paths is belt and braces.
    if wav_path.parent != voices or txt_path.parent != voices:
        raise InvalidVoiceValue(f"{field}: preset voice {name!r} is not a plain name")
    description = f"preset voice {name!r}"
    if not wav_path.is_file():
        _download_preset(name, voices, field, settings)
    if text is None:
        text = _stored_text(txt_path)
    return replace(_decoded(wav_path.read_bytes(), text, description, field, settings), kind="preset")


def _stored_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _from_openai_name(name: str, text: str | None, field: str, settings: Settings) -> ResolvedVoice:
    """One of OpenAI's voice names: its preset or profile, else its own description (never an error).

    Its preset is always the preset, never a saved voice that happens to share the name.
    """
    voice = OPENAI_VOICES[name]
    try:
        if voice.target.startswith(PROFILE_PREFIX):
            resolved: ResolvedVoice = _from_profile(
                voice.target.removeprefix(PROFILE_PREFIX), field, settings
            )
        else:
            resolved = _from_preset(voice.target, text, field, settings)
    except WorkerError as error:  # not fetched, not found, not audio: its description stands in
        logger.warning("OpenAI voice %r: %s; using its description instead", name, error)
        return DescribedVoice(voice.fallback, f"OpenAI voice {name!r}, described", kind="description")
    return replace(resolved, description=f"OpenAI voice {name!r}: {resolved.description}")


def _from_profile(name: str, field: str, settings: Settings) -> DescribedVoice:
    if not PRESET_NAME.fullmatch(name):
        raise InvalidVoiceValue(
            f"{field}: profile name {_shown(name)} is not allowed (letters, digits, '_' and '-', at most 64)"
        )
    profiles = _profiles(field, settings)
    if name not in profiles:
        known = ", ".join(sorted(profiles)[:LISTED_PRESETS])
        raise UnknownVoiceError(f"{field}: unknown profile {name!r}; profiles: {known}")
    return DescribedVoice(profiles[name], f"profile {name!r}")


def _profiles(field: str, settings: Settings) -> dict[str, str]:
    """The described voices of ``profile.yaml``: read from the volume, fetched and published on first use."""
    path = settings.voices_dir / PROFILES_FILE
    if path.is_file():
        return _parsed_profiles(path.read_bytes(), field, "the volume's " + PROFILES_FILE)
    base = settings.voices_base_url
    try:
        data = fetch(f"{base}/{PROFILES_FILE}", _voices_policy(settings))
    except FetchError as error:
        raise ReferenceAudioError(f"{field}: voice profiles could not be fetched: {error}") from None
    profiles = _parsed_profiles(data, field, f"{public_url(base)}/{PROFILES_FILE}")
    settings.voices_dir.mkdir(parents=True, exist_ok=True)
    publish(path, data)
    return profiles


def _parsed_profiles(data: bytes, field: str, source: str) -> dict[str, str]:
    """``{"profiles": {name: description}}``, as upstream's file holds them; anything else is refused."""
    try:
        parsed = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        parsed = None
    profiles = parsed.get("profiles") if isinstance(parsed, dict) else None
    if not isinstance(profiles, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in profiles.items()
    ):
        raise ReferenceAudioError(f"{field}: {source} is not a 'profiles:' mapping of names to descriptions")
    return {name: text.strip() for name, text in profiles.items()}


def _voices_policy(settings: Settings) -> FetchPolicy:
    base_host = (urlsplit(settings.voices_base_url).hostname or "").lower()
    return FetchPolicy(
        max_bytes=settings.max_reference_bytes,
        timeout_s=settings.reference_fetch_timeout_s,
        allowed_schemes=frozenset({"http", "https"}),
        # The operator's own voices server is trusted to be internal; hosts it redirects to are not.
        allowed_hosts=settings.reference_allowed_hosts | {base_host},
    )


def _download_preset(name: str, voices: Path, field: str, settings: Settings) -> None:
    """Fetch ``<name>.wav`` (+ ``.txt`` when upstream has one) and publish them on the volume.

    The transcript is published first and the audio last, so a worker that sees the ``.wav`` also sees the
    transcript. Each file appears whole or not at all (temp file + ``os.replace``); workers racing on the same
    voice each publish identical complete files, which is harmless.
    """
    base = settings.voices_base_url
    policy = _voices_policy(settings)
    try:
        audio = fetch(f"{base}/{name}.wav", policy)
    except FetchError as error:
        if error.status == 404:
            raise UnknownVoiceError(f"{field}: unknown preset voice {name!r}") from None
        raise ReferenceAudioError(f"{field}: preset voice {name!r} could not be fetched: {error}") from None
    try:
        decode_audio(audio)
    except AudioDecodeError as error:
        raise ReferenceAudioError(
            f"{field}: preset voice {name!r} from {public_url(base)} is not audio ({error})"
        ) from None
    try:
        transcript: bytes | None = fetch(f"{base}/{name}.txt", policy)
    except FetchError as error:
        if error.status != 404:
            raise ReferenceAudioError(
                f"{field}: preset voice {name!r} could not be fetched: {error}"
            ) from None
        transcript = None
    voices.mkdir(parents=True, exist_ok=True)
    if transcript is not None:
        publish(voices / f"{name}.txt", transcript)
    publish(voices / f"{name}.wav", audio)


def _available(settings: Settings) -> str:
    """The voices this worker has, for an error about a name it has not: saved ones, then presets."""
    parts = []
    for what, folder in (("saved voices", settings.saved_voices_dir), ("presets", settings.voices_dir)):
        names = sorted(p.stem for p in folder.glob("*.wav") if PRESET_NAME.fullmatch(p.stem))
        if names:
            shown = ", ".join(names[:LISTED_PRESETS]) + (", ..." if len(names) > LISTED_PRESETS else "")
            parts.append(f"{what} on this worker: {shown}")
    return "".join(f"; {part}" for part in parts)
