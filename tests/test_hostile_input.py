"""Hostile job input: every bad value is a clear ``{"error": ...}`` naming the field; the worker serves on.

A job's ``input`` is arbitrary JSON from the internet. The property test corrupts one field of a valid job at
a time (wrong types, out-of-range and non-finite numbers, huge values, nested garbage, references that are not
audio, too long, outside the voices directory or on a private network) and checks what the client gets back.
It drives the handler in-process, with the tiny model really generating; a real worker process then takes a
handful of hostile bodies over HTTP. The explicit limits (MAX_* settings) are checked to name their values.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from higgs_worker.audio.encoding import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from higgs_worker.delivery import validate_bucket_name
from higgs_worker.job.schema import ALIASES, ALLOWED_FIELDS, MAX_REF_TEXT_CHARS, MAX_SCENE_CHARS
from higgs_worker.pipeline import Pipeline
from higgs_worker.settings import load_settings
from higgs_worker.voices.resolve import PRESET_NAME
from queue_api.worker import run_job
from tests.support.checkpoints import complete_store
from tests.support.hub_server import HubServer
from tests.support.worker_process import LocalWorker, free_port, worker_env

VALID = {"transcript": "Hello there.", "max_new_tokens": 16, "seed": 1}
DEFAULT_MAX_TRANSCRIPT_CHARS = 20_000
DEFAULT_MAX_NEW_TOKENS = 4096
INTERNALS = ("Traceback", "internal error", 'File "', "site-packages")


def wav_uri(seconds: float, sample_rate: int, subtype: str = "PCM_16") -> str:
    """A valid WAV of a tone as a data URI; a low rate and 8-bit samples make hours cost little."""
    t = np.arange(int(seconds * sample_rate), dtype=np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, 0.5 * np.sin(t / 3), sample_rate, format="WAV", subtype=subtype)
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


TWO_HOURS_OF_AUDIO = wav_uri(2 * 3600, 100, "PCM_U8")  # 720 kB: under the byte limit, far over the seconds


def assert_clear_error(result: dict[str, Any], *fields: str) -> str:
    """The client's view of a bad input: one error string with a clause that starts with a field's name."""
    assert set(result) == {"error"}, result
    error = result["error"]
    assert isinstance(error, str), error
    named = "|".join(re.escape(field) for field in fields)
    assert re.search(rf"(^|; )({named})(:|\.|\[|,| and )", error), f"{fields} not named in: {error}"
    assert not any(marker in error for marker in INTERNALS), error
    assert len(error) < 2000, f"the error echoes the input: {error[:300]}..."
    return error


# -- strategies --------------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10))
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
containers = garbage.filter(lambda value: isinstance(value, (list, dict)))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
huge_ints = st.one_of(st.integers(min_value=2**40), st.integers(max_value=-(2**40)))
not_a_string = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=True), containers)
not_a_number = st.one_of(st.text(max_size=10), st.booleans(), containers)
not_an_int = st.one_of(not_a_number, st.floats(allow_nan=True))


def outside(low: float, high: float) -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(max_value=low).filter(lambda x: x < low),  # not -0.0 when low is 0.0: that is in range
        st.floats(min_value=high, exclude_min=True),
        non_finite,
        huge_ints,
    )


def long_text(minimum: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=minimum + 1, max_value=minimum + 3000).map(lambda n: "a" * n)


def invalid_bucket(name: str) -> bool:
    try:
        validate_bucket_name(name)
    except ValueError:
        return True
    return not 3 <= len(name) <= 63


random_bytes = st.binary(max_size=200).map(lambda data: b"\x00NOT AUDIO" + data)
ref_values = st.one_of(
    # not text at all, or a list holding something else
    st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=True)),
    st.dictionaries(st.text(max_size=5), garbage, max_size=3),
    st.lists(st.one_of(st.integers(), st.none(), containers), min_size=1, max_size=3),
    st.sampled_from(["", "   ", "\n"]),
    st.lists(st.just("en_woman"), min_size=9, max_size=12),
    # data URIs: not base64, not audio, not an audio type, empty, hours long
    st.text(alphabet="!@#$%^&*~ \n", min_size=1, max_size=20).map(lambda s: f"data:audio/wav;base64,{s}"),
    st.sampled_from(["data:audio/wav;base64,abc", "data:audio/wav;base64,QUJD=\n"]),
    random_bytes.map(lambda data: "data:audio/wav;base64," + base64.b64encode(data).decode()),
    random_bytes.map(lambda data: "data:text/plain;base64," + base64.b64encode(data).decode()),
    st.sampled_from(["data:audio/wav,rawbytes", "data:audio/wav;base64,", "data:"]),
    st.just(TWO_HOURS_OF_AUDIO),
    # preset names that try to leave the voices directory, or no voice at all
    st.sampled_from(
        ["../../etc/passwd", "..", "voices/../../x", "/etc/passwd", "..\\..\\win.ini", "a" * 65, "en_woman\n"]
    ),
    st.text(min_size=1, max_size=30).filter(
        lambda s: not PRESET_NAME.fullmatch(s) and not s.lower().startswith(("http", "data"))
    ),
    st.sampled_from(["en_woman", "unknown_voice"]),  # well formed, but the voices server is down
    # URLs that are not https, or lead into private networks
    st.sampled_from(
        [
            "http://127.0.0.1/a.wav",
            "HTTP://example.com/a.wav",
            "ftp://example.com/a.wav",
            "file:///etc/passwd",
            "gopher://127.0.0.1:70/",
            "javascript:alert(1)",
            "https://127.0.0.1/a.wav",
            "https://localhost/a.wav",
            "https://169.254.169.254/latest/meta-data/iam/",
            "https://[::1]/a.wav",
            "https://[::ffff:10.0.0.1]/a.wav",
            "https://10.1.2.3/a.wav?token=abc",
            "https://user:password@192.168.0.1/a.wav",
            "https://0.0.0.0/a.wav",
            "https:///a.wav",
            "https://127.0.0.1:99999/a.wav",
        ]
    ),
)

CORRUPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "transcript": st.one_of(
        st.none(),
        not_a_string,
        st.text(alphabet=" \t\n", max_size=5),
        long_text(DEFAULT_MAX_TRANSCRIPT_CHARS),
    ),
    "ref_audio": ref_values,
    "ref_text": st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.dictionaries(st.text(max_size=5), garbage, max_size=3),
        st.lists(st.one_of(st.none(), st.text(max_size=5)), min_size=1, max_size=3),  # no ref_audio to match
        st.text(max_size=20),  # a transcript for a reference that was not given
        long_text(MAX_REF_TEXT_CHARS),
    ),
    "scene_prompt": st.one_of(not_a_string, long_text(MAX_SCENE_CHARS)),
    "temperature": st.one_of(st.none(), not_a_number, outside(0.0, 2.0)),
    "top_p": st.one_of(st.none(), not_a_number, outside(0.0, 1.0), st.just(0.0)),
    "top_k": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=1025)),
    "seed": st.one_of(not_an_int, st.integers(max_value=-1), st.integers(min_value=2**32)),
    "max_new_tokens": st.one_of(
        st.none(), not_an_int, st.integers(max_value=15), st.integers(min_value=DEFAULT_MAX_NEW_TOKENS + 1)
    ),
    "output_format": st.one_of(
        st.none(),
        not_a_string,
        st.text(max_size=8).filter(lambda s: s not in {"wav", "flac", "mp3", "ogg", "opus"}),
    ),
    "sample_rate": st.one_of(
        not_an_int, st.integers().filter(lambda rate: not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE)
    ),
    "speed": st.one_of(st.none(), not_a_number, outside(0.25, 4.0)),
    "s3_bucket": st.one_of(not_a_string, st.text(max_size=70).filter(invalid_bucket)),
    "s3_key": st.one_of(not_a_string, st.text(max_size=40)),  # any key: there is no bucket to put it in
    "return_base64": st.one_of(st.none(), st.integers(), st.text(max_size=5), containers),
    "model": st.one_of(not_a_string, long_text(200)),
}


@st.composite
def corrupted_jobs(draw: st.DrawFn) -> tuple[Any, tuple[str, ...]]:
    """A valid job with exactly one thing wrong, and the names of which the error must use one."""
    kind = draw(st.sampled_from(["field"] * 4 + ["alias", "unknown", "conflict", "not an object"]))
    job: dict[str, Any] = dict(VALID)
    if kind == "not an object":
        return draw(st.one_of(scalars, st.lists(garbage, max_size=3))), ("input",)
    if kind == "unknown":
        name = draw(st.text(min_size=1, max_size=30).filter(lambda s: s not in ALLOWED_FIELDS))
        job[name] = draw(garbage)
        return job, (name,)
    if kind == "conflict":
        alias, field = draw(st.sampled_from(sorted(ALIASES.items())))
        job[field] = {"ref_audio": "en_woman", "output_format": "wav", "scene_prompt": "A hall."}.get(
            field, job.get(field)
        )
        job[alias] = draw(garbage.filter(lambda value: value != job[field]))
        return job, (alias,)
    field = draw(st.sampled_from(sorted(CORRUPTIONS)))
    value = draw(CORRUPTIONS[field])
    if kind == "alias" and field in ALIASES.values():
        alias = next(a for a, f in ALIASES.items() if f == field)
        job.pop(field, None)
        job[alias] = value
        # Naming the alias as sent is checked on its own below; here either name will do.
        return job, (alias, field)
    job[field] = value
    return job, (field,)


# -- in-process --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The handler's worker on a volume with a complete store; the preset voices server is down."""
    volume = tmp_path_factory.mktemp("hostile") / "volume"
    worker_settings = load_settings(
        {"RUNPOD_VOLUME_PATH": str(volume), "VOICES_BASE_URL": f"http://127.0.0.1:{free_port()}/voices"}
    )
    complete_store(worker_settings, hub.url)
    return Pipeline(worker_settings)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(corrupted_jobs())
def check_one_bad_field_is_named_and_the_next_job_succeeds(
    worker: Pipeline, case: tuple[Any, tuple[str, ...]]
) -> None:
    job_input, fields = case
    assert_clear_error(run_job(worker, {"id": "hostile", "input": job_input}), *fields)
    # The same deterministic job each time: generated once, then answered from the result cache.
    after = run_job(worker, {"id": "next", "input": VALID})
    assert "audio_base64" in after, after


def test_every_single_bad_field_is_named_and_the_worker_keeps_generating(worker: Pipeline) -> None:
    check_one_bad_field_is_named_and_the_next_job_succeeds(worker)
    # and the engine itself still generates (sampling without a seed is never cached)
    fresh = run_job(worker, {"id": "fresh", "input": {"transcript": "After all that.", "max_new_tokens": 20}})
    assert fresh.get("cache_hit") is False and "audio_base64" in fresh, fresh


@pytest.mark.parametrize(
    ("env", "job_input", "field", "limit_text"),
    [
        (
            {"MAX_TRANSCRIPT_CHARS": "100"},
            {"transcript": "x" * 101},
            "transcript",
            "at most 100 characters (got 101)",
        ),
        (
            {"MAX_NEW_TOKENS_LIMIT": "64"},
            {"transcript": "hi", "max_new_tokens": 65},
            "max_new_tokens",
            "between 16 and 64",
        ),
        (
            {"MAX_REFERENCE_BYTES": "2048"},
            {"transcript": "hi", "ref_audio": wav_uri(1.0, 8000)},
            "ref_audio",
            "larger than the limit of 2048 bytes",
        ),
        (
            {"MAX_REFERENCE_SECONDS": "2"},
            {"transcript": "hi", "ref_audio": wav_uri(3.0, 8000)},
            "ref_audio",
            "3.0 s long; the limit is 2 s",
        ),
        (
            {},
            {"transcript": "hi", "ref_audio": TWO_HOURS_OF_AUDIO},
            "ref_audio",
            "7200.0 s long; the limit is 60 s",
        ),
        (
            {},
            {"transcript": "hi", "s3_bucket": "audio-out", "s3_key": "my clip.wav"},
            "s3_key",
            "may contain only letters, digits, '/', and ! - _ . * ' ( ) =",
        ),
        (
            {},
            {"transcript": "hi", "s3_bucket": "audio-out", "s3_key": "é" * 600},
            "s3_key",
            "1200 bytes long; the limit is 1024",
        ),
    ],
)
def test_each_limit_is_named_in_its_error(
    tmp_path: Path, env: dict[str, str], job_input: dict[str, Any], field: str, limit_text: str
) -> None:
    # These checks all come before the models are needed, so this worker never loads any.
    limited = Pipeline(load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path / "volume"), **env}))
    error = assert_clear_error(run_job(limited, {"id": "limit", "input": job_input}), field)
    assert limit_text in error, error


@pytest.mark.parametrize(
    ("job_input", "field", "shown"),
    [
        (
            {"transcript": "hi", **{f"extra{i}": i for i in range(20_000)}},
            "extra0",
            "extra0, extra1, extra2, extra3, extra4 and 19995 more: unknown fields; allowed fields are ",
        ),
        ({"transcript": "hi", "x" * 100_000: 1}, "x" * 37, "x" * 37 + "...: unknown field; allowed"),
    ],
)
def test_an_error_stays_short_however_many_or_long_the_unknown_fields(
    worker: Pipeline, job_input: dict[str, Any], field: str, shown: str
) -> None:
    error = assert_clear_error(run_job(worker, {"id": "flood", "input": job_input}), field)
    assert shown in error, error


@pytest.mark.parametrize(
    ("job_input", "alias"),
    [
        ({"input": 42}, "input"),
        ({"input": "   "}, "input"),
        ({"input": "x" * (DEFAULT_MAX_TRANSCRIPT_CHARS + 1)}, "input"),
        ({"input": "hi", "response_format": "aac"}, "response_format"),
        ({"input": "hi", "instructions": "x" * (MAX_SCENE_CHARS + 1)}, "instructions"),
        ({"input": "hi", "voice": "../etc/passwd"}, "voice"),
    ],
)
def test_a_bad_openai_field_is_named_as_the_client_sent_it(
    worker: Pipeline, job_input: dict[str, Any], alias: str
) -> None:
    """An OpenAI client sends ``input``/``voice``/...: the error must name the field it sent, not ours."""
    assert_clear_error(run_job(worker, {"id": "openai", "input": job_input}), alias)


# -- through a real worker process -------------------------------------------------------------------------

HOSTILE_BODIES = [
    b'{"input": null}',
    b'{"input": "just a string"}',
    b'{"input": [1, 2, 3]}',
    b'{"input": {"transcript": "hi", "temperature": NaN}}',
    b'{"input": {"transcript": "hi", "top_p": Infinity}}',
    b'{"input": {"transcript": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    json.dumps({"input": {"transcript": "hi", **{f"field{i}": [{"x": i}] for i in range(500)}}}).encode(),
    json.dumps({"input": {"transcript": "x" * 200_000}}).encode(),
    b'{"input": {"transcript": "hi", "ref_audio": "data:audio/wav;base64,' + b"A" * 16_000_000 + b'"}}',
    b"not json at all",
]


def post_raw(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@pytest.mark.slow
def test_a_real_worker_survives_hostile_bodies_and_then_generates(hub: HubServer, tmp_path: Path) -> None:
    with LocalWorker(worker_env(tmp_path / "volume", hub.url), tmp_path / "worker.log") as local:
        for body in HOSTILE_BODIES:
            status, text = post_raw(f"{local.url}/runsync", body)
            assert local.process.poll() is None, f"the worker died on {body[:60]!r}:\n{local.log}"
            if status == 200:
                result = json.loads(text)
                assert result["status"] == "FAILED" and isinstance(result["error"], str), result
                assert not any(marker in result["error"] for marker in INTERNALS), result
            else:
                assert 400 <= status < 500, (status, text[:500])
        result = local.runsync({"transcript": "Still alive.", "max_new_tokens": 16})
    assert result["status"] == "COMPLETED", result
