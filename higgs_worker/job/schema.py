"""The job input: what a client may send, checked field by field, with errors that say what is allowed.

Why pydantic in strict mode: a job's ``input`` is arbitrary JSON from the internet. Strict types (no "0.7"
for a number, no ``true`` for an integer), no NaN, and no unknown fields mean a typo such as ``temprature``
fails loudly instead of being ignored. All problems are reported at once, one ``field: reason`` each.

OpenAI's ``/v1/audio/speech`` body is accepted unchanged: ``input``, ``voice``, ``response_format``,
``instructions`` are aliases of ``transcript``, ``ref_audio``, ``output_format``, ``scene_prompt``; ``speed``
changes the tempo after generation; ``model`` is accepted and ignored (this endpoint serves one model).

The rendering fields follow the upstream generation script's options: ``ref_audio_in_system_message``,
``chunk_method``, ``chunk_max_word_num``, ``chunk_max_num_turns``, ``generation_chunk_buffer_size``; and
``voice_description`` describes a speaker in words (the script's ``profile:`` voices, in the user's words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from boson_multimodal.speech_request import SamplingConfig
from higgs_worker.audio.encoding import FORMATS, MAX_SPEED, MIN_SPEED
from higgs_worker.errors import RequestError
from higgs_worker.quality.finishing import MAX_LOUDNESS_LUFS, MIN_LOUDNESS_LUFS
from higgs_worker.quality.verification import MAX_ATTEMPTS as MAX_VERIFY_ATTEMPTS
from higgs_worker.voices.resolve import PROFILE_PREFIX

ChunkMethod = Literal["sentence", "speaker", "word", "none"]
MAX_DESCRIPTION_CHARS = 2000
DEFAULT_CHUNK_MAX_WORDS = 200  # the upstream script's defaults
DEFAULT_CHUNK_MAX_TURNS = 1
DEFAULT_CHUNK_BUFFER = 2  # the upstream README's long-form example; the script's own default is unbounded
MAX_CHUNK_BUFFER = 8
MAX_SCENE_CHARS = 2000
MAX_REF_TEXT_CHARS = 2000
MAX_SPEAKERS = 8
MAX_NAMED_UNKNOWN = 5  # unknown fields named in an error; the rest are counted
SPEAKER_TAG = re.compile(r"\[SPEAKER(\d+)\]")

# alias → our field
ALIASES = {
    "input": "transcript",
    "voice": "ref_audio",
    "response_format": "output_format",
    "instructions": "scene_prompt",
}


@dataclass(frozen=True)
class RequestLimits:
    max_transcript_chars: int
    max_new_tokens: int


class TTSRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    transcript: str = Field(min_length=1)
    ref_audio: str | list[str] | None = None
    ref_text: str | list[str | None] | None = None
    scene_prompt: str | None = Field(default=None, max_length=MAX_SCENE_CHARS)
    # sampling: the engine's own defaults (boson_multimodal.speech_request.SamplingConfig)
    temperature: float = Field(default=SamplingConfig.temperature, ge=0.0, le=2.0)
    top_p: float = Field(default=SamplingConfig.top_p, gt=0.0, le=1.0)
    top_k: int | None = Field(default=SamplingConfig.top_k, ge=1, le=1024)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    max_new_tokens: int = Field(default=SamplingConfig.max_new_tokens, ge=16)
    output_format: str = "wav"  # one of FORMATS (higgs_worker.audio.encoding), checked below
    sample_rate: int | None = None
    speed: float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED)
    s3_bucket: str | None = Field(default=None, min_length=3, max_length=63)
    s3_key: str | None = Field(default=None, min_length=1, max_length=1024)
    return_base64: bool = False
    model: str | None = Field(default=None, max_length=200)
    voice_description: str | list[str | None] | None = None
    ref_audio_in_system_message: bool = False
    chunk_method: ChunkMethod = "sentence"
    chunk_max_word_num: int | None = Field(default=None, ge=1, le=1000)
    chunk_max_num_turns: int | None = Field(default=None, ge=1, le=64)
    generation_chunk_buffer_size: int | None = Field(default=None, ge=0, le=MAX_CHUNK_BUFFER)
    dry_run: bool = False
    # -- finishing, word timestamps and verification (higgs_worker/quality) --
    loudness_lufs: float | None = Field(default=None, ge=MIN_LOUDNESS_LUFS, le=MAX_LOUDNESS_LUFS)
    trim_silence: bool = False
    timestamps: Literal["none", "word"] = "none"
    captions: Literal["srt", "vtt"] | None = None
    verify: bool = False
    max_wer: float | None = Field(default=None, ge=0.0, le=1.0)
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_VERIFY_ATTEMPTS)
    require_verified: bool = False
    _sent_as: dict[str, str] = PrivateAttr(default_factory=dict)  # field → the alias the client used

    @field_validator("output_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"output_format: must be one of {', '.join(FORMATS)}")
        return value

    @model_validator(mode="after")
    def _check_cross_field(self) -> TTSRequest:
        problems = []
        if not self.transcript.strip():
            problems.append("transcript: must contain text, not only whitespace")
        if self.sample_rate is not None:
            try:  # each format has its own rates (Opus: 8–48 kHz in steps; MP3: the MPEG rates)
                FORMATS[self.output_format].check_sample_rate(self.sample_rate)
            except ValueError as error:
                problems.append("sample_rate: " + str(error).removeprefix("sample_rate "))
        references = self.references
        if len(references) > MAX_SPEAKERS:
            problems.append(f"ref_audio: at most {MAX_SPEAKERS} references (one per speaker)")
        if any(not r.strip() for r in references):
            problems.append("ref_audio: references must be non-empty strings")
        texts = self.reference_texts
        if isinstance(self.ref_text, list) and len(texts) != len(references):
            problems.append(f"ref_text: a list must have one entry per ref_audio entry ({len(references)})")
        if isinstance(self.ref_text, str) and len(references) != 1:
            problems.append(
                "ref_text: a single transcript needs exactly one ref_audio; use a list for several"
            )
        if any(t is not None and len(t) > MAX_REF_TEXT_CHARS for t in texts):
            problems.append(f"ref_text: each transcript must be at most {MAX_REF_TEXT_CHARS} characters")
        problems += self._voice_problems()
        problems += self._chunking_problems()
        problems += [f"{name}: only used with verify: true" for name in self._verify_options_unused()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _voice_problems(self) -> list[str]:
        """Each speaker has one voice: a ``ref_audio`` entry or a ``voice_description`` entry, not both."""
        problems = []
        references, texts, descriptions = self.references, self.reference_texts, self.voice_descriptions
        for index, (reference, text) in enumerate(zip(references, texts, strict=False)):
            if text is not None and reference.startswith(PROFILE_PREFIX):
                name = self._item("ref_text", index)
                problems.append(f"{name}: a profile voice has no audio to transcribe")
        if len(descriptions) > MAX_SPEAKERS:
            problems.append(f"voice_description: at most {MAX_SPEAKERS} descriptions (one per speaker)")
        for index, description in enumerate(descriptions):
            name = self._item("voice_description", index)
            if description is not None and not description.strip():
                problems.append(f"{name}: must contain words, or be null")
            elif description is not None and len(description) > MAX_DESCRIPTION_CHARS:
                problems.append(f"{name}: at most {MAX_DESCRIPTION_CHARS} characters")
            elif description is not None and index < len(references):
                problems.append(
                    f"{name}: speaker {index} already has a voice from {self._item('ref_audio', index)}; "
                    "give one or the other (null keeps the ref_audio voice)"
                )
            elif description is None and index >= len(references):
                problems.append(f"{name}: speaker {index} has no voice; describe it or give ref_audio")
        voices = self.voice_count
        tagged = sorted({int(i) for i in SPEAKER_TAG.findall(self.transcript)})
        if voices > 1 and tagged and max(tagged) >= voices:
            problems.append(
                f"transcript: tags [SPEAKER{max(tagged)}] but ref_audio and voice_description give {voices} "
                f"voices ([SPEAKER0] to [SPEAKER{voices - 1}])"
            )
        if self.ref_audio_in_system_message and not references:
            problems.append("ref_audio_in_system_message: needs ref_audio (descriptions always go there)")
        return problems

    def _chunking_problems(self) -> list[str]:
        """A chunking option given for a method that does not use it is a mistake worth naming."""
        problems = []
        uses = {
            "chunk_max_word_num": ("word",),
            "chunk_max_num_turns": ("speaker",),
            "generation_chunk_buffer_size": ("speaker", "word"),
        }
        for field, methods in uses.items():
            if getattr(self, field) is not None and self.chunk_method not in methods:
                needed = " or ".join(repr(m) for m in methods)
                problems.append(f"{field}: only used with chunk_method {needed} (got {self.chunk_method!r})")
        return problems

    def _verify_options_unused(self) -> list[str]:
        """The verification options given without ``verify``."""
        given = {"max_wer": self.max_wer is not None, "max_attempts": self.max_attempts is not None}
        given["require_verified"] = self.require_verified
        return [] if self.verify else [name for name, present in given.items() if present]

    def _item(self, field: str, index: int) -> str:
        """How an error names entry ``index`` of a field: ``field[i]`` for a list, ``field`` for a string."""
        return f"{field}[{index}]" if isinstance(getattr(self, field), list) else field

    def sent_name(self, field: str) -> str:
        """The name the client used for ``field`` (an OpenAI alias, or the field itself)."""
        return self._sent_as.get(field, field)

    @property
    def references(self) -> list[str]:
        if self.ref_audio is None:
            return []
        return [self.ref_audio] if isinstance(self.ref_audio, str) else list(self.ref_audio)

    @property
    def voice_descriptions(self) -> list[str | None]:
        """The description of speaker i, or None where ``ref_audio`` gives that speaker's voice."""
        if self.voice_description is None:
            return []
        if isinstance(self.voice_description, str):
            return [self.voice_description]
        return list(self.voice_description)

    @property
    def voice_count(self) -> int:
        return max(len(self.references), len(self.voice_descriptions))

    @property
    def chunk_max_words(self) -> int:
        return self.chunk_max_word_num or DEFAULT_CHUNK_MAX_WORDS

    @property
    def chunk_max_turns(self) -> int:
        return self.chunk_max_num_turns or DEFAULT_CHUNK_MAX_TURNS

    @property
    def chunk_buffer(self) -> int:
        size = self.generation_chunk_buffer_size
        return DEFAULT_CHUNK_BUFFER if size is None else size

    @property
    def reference_texts(self) -> list[str | None]:
        if self.ref_text is None:
            return [None] * len(self.references)
        return [self.ref_text] if isinstance(self.ref_text, str) else list(self.ref_text)


ALLOWED_FIELDS = sorted([*TTSRequest.model_fields, *ALIASES])


def _apply_aliases(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Move alias values to their fields; also return which fields the client named by an alias."""
    data, problems, sent_as = dict(raw), [], {}
    for alias, field in ALIASES.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if field in data and data[field] != value:
            problems.append(
                f"{alias} and {field}: both given with different values; {alias} is an alias of {field}"
            )
        else:
            data[field] = value
            sent_as[field] = alias
    return data, problems, sent_as


# A union type fails once per member ("ref_audio.str", "ref_audio.list[str].0"); one sentence says it better.
UNION_FIELDS = {
    "ref_audio": (
        "must be a string (a preset voice name, 'profile:<name>', an OpenAI voice name, a data: URI or an "
        "https:// URL) or a list of them"
    ),
    "ref_text": "must be a string or a list with one string (or null) per ref_audio entry",
    "voice_description": "must be a string or a list with one string (or null) per speaker",
}


def _describe(error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc) or "input"
    if loc and loc[0] in UNION_FIELDS and error["type"] != "value_error":
        return f"{loc[0]}: {UNION_FIELDS[loc[0]]}"
    if error["type"] == "missing":
        return f"{field}: required"
    if error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    message = error["msg"]
    if error["type"] == "literal_error":
        message = "must be one of " + message.removeprefix("Input should be ").replace("'", "")
    return f"{field}: {message}"


def _as_sent(message: str, sent_as: dict[str, str]) -> str:
    """Name fields the way the client sent them: an OpenAI client that sent ``input`` reads ``input: …``.

    A field leading a clause is always renamed; inside a clause only names that are never English words
    (``ref_audio``, ``output_format``, ``scene_prompt``), as in "not supported by output_format 'opus'".
    """
    for field, alias in sent_as.items():
        message = re.sub(rf"(^|; ){field}(?=[:.\[ ])", rf"\g<1>{alias}", message)
        if field != "transcript":
            message = re.sub(rf"(?<=[ (]){field}\b(?!:)", alias, message)
    return message


def _describe_unknown(names: list[str]) -> str:
    """One clause for all unknown fields, of bounded length: a job may send thousands, or huge names."""
    shown = ", ".join(name if len(name) <= 40 else name[:37] + "..." for name in names[:MAX_NAMED_UNKNOWN])
    more = f" and {len(names) - MAX_NAMED_UNKNOWN} more" if len(names) > MAX_NAMED_UNKNOWN else ""
    noun = "unknown field" if len(names) == 1 else "unknown fields"
    return f"{shown}{more}: {noun}; allowed fields are {', '.join(ALLOWED_FIELDS)}"


def parse_request(raw: Any, limits: RequestLimits, *, openai_names: bool = False) -> TTSRequest:
    """Validate a job's ``input``; raises RequestError naming every offending field.

    ``openai_names``: the body came through OpenAI's route, so a field the client did not send at all is
    named as OpenAI names it (a missing ``input``, not ``transcript``). A field sent under either name is
    always named as it was sent.
    """
    if not isinstance(raw, dict):
        raise RequestError(
            f"input: must be a JSON object with at least a transcript, got {type(raw).__name__}"
        )
    data, problems, sent_as = _apply_aliases(raw)
    if openai_names:
        sent_as = {field: alias for alias, field in ALIASES.items() if field not in raw} | sent_as
    try:
        request = TTSRequest.model_validate(data)
    except ValidationError as error:
        errors = error.errors()
        described = [_describe(e) for e in errors if e["type"] != "extra_forbidden"]
        unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            described.append(_describe_unknown(unknown))
        message = "; ".join(problems + list(dict.fromkeys(described)))
        raise RequestError(_as_sent(message, sent_as)) from None
    if len(request.transcript) > limits.max_transcript_chars:
        problems.append(
            f"transcript: at most {limits.max_transcript_chars} characters (got {len(request.transcript)})"
        )
    if request.max_new_tokens > limits.max_new_tokens:
        problems.append(f"max_new_tokens: must be between 16 and {limits.max_new_tokens}")
    if problems:
        raise RequestError(_as_sent("; ".join(problems), sent_as))
    request._sent_as = sent_as
    return request
