"""Reference voices end to end: presets fetched once onto the volume, data URIs, URLs over real sockets."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_worker.errors import UnknownVoiceError, WorkerError
from higgs_worker.settings import Settings, load_settings
from higgs_worker.voices.resolve import ReferenceAudio, resolve_reference
from tests.support.loopback_http import (
    LoopbackServer,
    TlsFiles,
    make_tls_files,
    send_body,
    send_redirect,
    send_trickle,
)

FIELD = "ref_audio"
TRANSCRIPT = "The quick brown fox jumps over the lazy dog."


def audio_bytes(seconds: float, file_format: str = "WAV", sample_rate: int = 16_000) -> bytes:
    """A voiced-like tone (fundamental + harmonics), encoded by libsndfile."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(0.2 / k * np.sin(2 * np.pi * 140 * k * t) for k in range(1, 6)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format=file_format, subtype="PCM_16")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "audio/wav") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


VOICE_WAV = audio_bytes(1.5)


@pytest.fixture
def voices_server() -> Iterator[LoopbackServer]:
    routes = {
        "/voices/en_woman.wav": send_body(VOICE_WAV, "audio/wav"),
        "/voices/en_woman.txt": send_body(f"{TRANSCRIPT}\n".encode(), "text/plain"),
        "/voices/no_transcript.wav": send_body(VOICE_WAV, "audio/wav"),
        "/voices/html_page.wav": send_body(b"<html>moved</html>", "text/html"),
    }
    with LoopbackServer(routes).running() as running:
        yield running


@pytest.fixture
def settings(tmp_path: Path, voices_server: LoopbackServer) -> Settings:
    return load_settings(
        {
            "RUNPOD_VOLUME_PATH": str(tmp_path / "volume"),
            "VOICES_BASE_URL": voices_server.url("/voices/"),
            "REFERENCE_FETCH_TIMEOUT_S": "5",
        }
    )


def resolve(value: str, settings: Settings, ref_text: str | None = None) -> ReferenceAudio:
    return resolve_reference(value, ref_text, field=FIELD, settings=settings)


def refused(value: str, settings: Settings, ref_text: str | None = None, *, status: int = 422) -> str:
    """The error message for a value that must be refused; every one starts with the field name.

    ``status``: 400 for a value of no allowed form, 404 for a name no voice has, 422 for a voice that
    cannot be used (the README's table).
    """
    with pytest.raises(WorkerError) as error:
        resolve(value, settings, ref_text)
    assert error.value.status == status, (type(error.value).__name__, str(error.value))
    message = str(error.value)
    assert message.startswith(f"{FIELD}: "), message
    return message


# --- preset voices ---------------------------------------------------------------------------------------


def test_preset_is_fetched_once_then_served_from_the_volume(
    settings: Settings, voices_server: LoopbackServer
) -> None:
    first = resolve("en_woman", settings)
    assert first.text == TRANSCRIPT
    assert first.description == "preset voice 'en_woman'"
    assert first.sample_rate == 16_000
    assert first.waveform.dtype == np.float32 and first.waveform.ndim == 1
    assert first.waveform.size == int(1.5 * 16_000)
    assert (settings.voices_dir / "en_woman.wav").read_bytes() == VOICE_WAV
    assert (settings.voices_dir / "en_woman.txt").read_text() == f"{TRANSCRIPT}\n"
    assert sorted(path for path, _ in voices_server.requests) == [
        "/voices/en_woman.txt",
        "/voices/en_woman.wav",
    ]

    second = resolve("en_woman", settings)
    assert len(voices_server.requests) == 2  # no network the second time
    np.testing.assert_array_equal(second.waveform, first.waveform)
    assert second.text == TRANSCRIPT


def test_job_transcript_takes_precedence_over_the_preset_one(settings: Settings) -> None:
    assert resolve("en_woman", settings, ref_text="my own words").text == "my own words"


def test_preset_without_an_upstream_transcript_has_no_text(
    settings: Settings, voices_server: LoopbackServer
) -> None:
    assert resolve("no_transcript", settings).text is None
    assert resolve("no_transcript", settings).text is None
    assert not (settings.voices_dir / "no_transcript.txt").exists()
    assert len(voices_server.requests) == 2  # .wav and the missing .txt, once


def test_presets_placed_on_the_volume_by_the_operator_need_no_network(
    settings: Settings, voices_server: LoopbackServer
) -> None:
    settings.voices_dir.mkdir(parents=True)
    (settings.voices_dir / "house_voice.wav").write_bytes(audio_bytes(1.0, "FLAC"))
    (settings.voices_dir / "house_voice.txt").write_text("Welcome.\n")
    reference = resolve("house_voice", settings)
    assert reference.text == "Welcome."
    assert voices_server.requests == []


def test_unknown_preset_is_named_and_local_presets_are_listed(settings: Settings) -> None:
    assert refused("nope", settings, status=404) == "ref_audio: no saved voice or preset voice named 'nope'"
    resolve("en_woman", settings)
    assert (
        refused("nope", settings, status=404)
        == "ref_audio: no saved voice or preset voice named 'nope'; presets on this worker: en_woman"
    )


def test_upstream_content_that_is_not_audio_is_not_published(settings: Settings) -> None:
    assert "is not audio" in refused("html_page", settings)
    assert not (settings.voices_dir / "html_page.wav").exists()


def test_unreachable_voices_server_is_reported(settings: Settings, voices_server: LoopbackServer) -> None:
    down = dataclasses.replace(settings, voices_base_url="http://127.0.0.1:9/voices")
    assert "preset voice 'en_woman' could not be fetched" in refused("en_woman", down)


@pytest.mark.parametrize(
    "value",
    [
        "../x",
        "..%2Fx",
        "%2e%2e%2fetc",
        "/etc/passwd",
        "a/b",
        "x\\y",
        "..",
        ".hidden",
        "-rf",
        "x\x00y",
        "en_woman\n",
        "C:\\voices\\x",
        "a" * 65,
        "",
    ],
)
def test_names_that_could_leave_the_voices_directory_are_refused(
    settings: Settings, voices_server: LoopbackServer, value: str
) -> None:
    message = refused(value, settings, status=400)
    assert "preset voice name" in message
    assert voices_server.requests == []
    assert not settings.voices_dir.exists()


def test_concurrent_first_use_publishes_whole_files(
    settings: Settings, voices_server: LoopbackServer
) -> None:
    workers = 8
    barrier = threading.Barrier(workers)
    results: list[ReferenceAudio | BaseException] = []

    def use_voice() -> None:
        barrier.wait()
        try:
            results.append(resolve("en_woman", settings))
        except BaseException as error:  # collected and asserted below
            results.append(error)

    threads = [threading.Thread(target=use_voice) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(isinstance(result, ReferenceAudio) for result in results), results
    assert all(result.text == TRANSCRIPT for result in results)  # type: ignore[union-attr]
    assert (settings.voices_dir / "en_woman.wav").read_bytes() == VOICE_WAV
    assert sorted(p.name for p in settings.voices_dir.iterdir()) == ["en_woman.txt", "en_woman.wav"]


# --- data URIs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_format", "mime"),
    [
        ("WAV", "audio/wav"),
        ("FLAC", "audio/flac"),
        ("WAV", "application/octet-stream"),
        ("FLAC", "AUDIO/X-FLAC"),
        ("WAV", "audio/wav;rate=16000"),
    ],
)
def test_data_uri_audio_is_decoded(settings: Settings, file_format: str, mime: str) -> None:
    reference = resolve(data_uri(audio_bytes(1.0, file_format), mime), settings, ref_text=TRANSCRIPT)
    assert reference.sample_rate == 16_000
    assert reference.waveform.size == 16_000
    assert reference.text == TRANSCRIPT
    assert reference.description == "inline data URI"


def test_data_uri_with_real_speech_keeps_its_native_rate(settings: Settings, spoken_reference: Path) -> None:
    reference = resolve(data_uri(spoken_reference.read_bytes()), settings, ref_text=TRANSCRIPT)
    assert reference.sample_rate == 22_050  # espeak-ng's rate: resampling is the engine's business
    assert 1.0 < reference.waveform.size / reference.sample_rate < 10.0
    assert float(np.abs(reference.waveform).max()) > 0.05  # speech, not silence


def test_data_uri_transcript_is_optional(settings: Settings) -> None:
    assert resolve(data_uri(audio_bytes(1.0)), settings).text is None


@pytest.mark.parametrize(
    "value",
    [
        "data:audio/wav,RIFF",  # not base64
        "data:text/plain;base64,aGVsbG8=",
        "data:;base64,aGVsbG8=",
        "data:audio/wav;base64",
    ],
)
def test_malformed_data_uris_are_refused(settings: Settings, value: str) -> None:
    message = refused(value, settings, status=400)
    assert "data URI must look like 'data:audio/<type>;base64,<payload>'" in message


@pytest.mark.parametrize(
    "payload",
    [
        "not*base64!",
        base64.b64encode(VOICE_WAV).decode()[:-1],  # padding cut
        base64.b64encode(VOICE_WAV).decode().replace("A", " A", 1),  # whitespace
        base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(),  # URL-safe alphabet
    ],
)
def test_invalid_base64_is_refused(settings: Settings, payload: str) -> None:
    assert "not valid base64" in refused(f"data:audio/wav;base64,{payload}", settings, status=400)


def test_data_uri_that_is_not_audio_is_refused(settings: Settings) -> None:
    message = refused(data_uri(b"hello, this is text" * 10), settings)
    assert message.startswith("ref_audio: the content of inline data URI is not audio (")


def test_empty_audio_is_refused(settings: Settings) -> None:
    assert (
        refused(data_uri(audio_bytes(0.0)), settings) == "ref_audio: inline data URI holds no audio samples"
    )


def test_data_uri_over_the_size_limit_is_refused_before_decoding(settings: Settings) -> None:
    small = dataclasses.replace(settings, max_reference_bytes=4096)
    message = refused(data_uri(audio_bytes(1.0)), small)
    assert message == "ref_audio: the data URI's audio is larger than the limit of 4096 bytes"
    # The estimate comes from the length alone: an over-long payload of garbage is refused for its size.
    assert "larger than the limit" in refused("data:audio/wav;base64," + "!" * 10_000, small)


def test_audio_over_the_duration_limit_is_refused(settings: Settings) -> None:
    short = dataclasses.replace(settings, max_reference_seconds=1.0)
    message = refused(data_uri(audio_bytes(2.5)), short)
    assert message == "ref_audio: inline data URI is 2.5 s long; the limit is 1 s"


def test_audio_too_short_to_be_a_voice_is_refused(settings: Settings) -> None:
    # 100 samples once crashed the codec's convolutions deep inside generation; now it is the client's error.
    message = refused(data_uri(audio_bytes(100 / 16_000)), settings)
    assert message == "ref_audio: inline data URI is 0.006 s long; a reference needs at least 0.5 s"
    assert resolve(data_uri(audio_bytes(0.5)), settings).waveform.size == 8000


# --- URLs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_server(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    """An HTTPS audio host on loopback whose CA the process trusts via SSL_CERT_FILE (as operators can)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    routes = {
        "/voice.wav": send_body(VOICE_WAV, "audio/wav"),
        "/long.wav": send_body(audio_bytes(3.0), "audio/wav"),
        "/page.html": send_body(b"<!doctype html><p>not audio</p>", "text/html"),
        "/slow.wav": send_trickle(),
        "/to-metadata": send_redirect("https://169.254.169.254/latest/meta-data/iam/"),
    }
    with LoopbackServer(routes, tls).running() as running:
        yield running


def allowing(settings: Settings, *hosts: str) -> Settings:
    return dataclasses.replace(settings, reference_allowed_hosts=frozenset(hosts))


def test_url_on_an_allowed_internal_host_is_fetched_over_verified_https(
    settings: Settings, https_server: LoopbackServer
) -> None:
    url = https_server.url("/voice.wav?token=s3cr3t", host="localhost")
    reference = resolve(url, allowing(settings, "localhost"), ref_text=TRANSCRIPT)
    assert reference.waveform.size == int(1.5 * 16_000)
    assert reference.text == TRANSCRIPT
    assert reference.description == https_server.url("/voice.wav", host="localhost")


def test_the_same_url_is_refused_without_the_allow_list(
    settings: Settings, https_server: LoopbackServer
) -> None:
    message = refused(https_server.url("/voice.wav?token=s3cr3t", host="localhost"), settings)
    assert "non-public address" in message
    assert "s3cr3t" not in message
    assert https_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/voice.wav",
        "https://10.0.0.7/voice.wav",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/voice.wav",
        "https://localhost/voice.wav",
    ],
)
def test_private_destinations_are_refused(settings: Settings, url: str) -> None:
    assert "non-public address" in refused(url, settings)


def test_plain_http_is_refused_by_default_and_allowed_when_configured(
    settings: Settings, voices_server: LoopbackServer
) -> None:
    url = voices_server.url("/voices/en_woman.wav", host="localhost")
    assert "use https://" in refused(url, allowing(settings, "localhost"))
    permissive = dataclasses.replace(allowing(settings, "localhost"), allow_http_reference=True)
    assert resolve(url, permissive).sample_rate == 16_000


def test_redirect_to_a_metadata_address_is_refused(settings: Settings, https_server: LoopbackServer) -> None:
    url = https_server.url("/to-metadata", host="localhost")
    assert "169.254.169.254" in refused(url, allowing(settings, "localhost"))


def test_url_content_that_is_not_audio_is_refused(settings: Settings, https_server: LoopbackServer) -> None:
    url = https_server.url("/page.html?sig=s3cr3t", host="localhost")
    message = refused(url, allowing(settings, "localhost"))
    assert message.startswith(f"ref_audio: the content of {https_server.url('/page.html', host='localhost')}")
    assert "is not audio" in message
    assert "s3cr3t" not in message


def test_url_audio_over_the_limits_is_refused(settings: Settings, https_server: LoopbackServer) -> None:
    allowed = allowing(settings, "localhost")
    url = https_server.url("/long.wav", host="localhost")
    assert "3.0 s long; the limit is 2 s" in refused(
        url, dataclasses.replace(allowed, max_reference_seconds=2.0)
    )
    assert "larger than the limit of 2048 bytes" in refused(
        url, dataclasses.replace(allowed, max_reference_bytes=2048)
    )


def test_slow_url_hits_the_fetch_timeout(settings: Settings, https_server: LoopbackServer) -> None:
    slow = dataclasses.replace(allowing(settings, "localhost"), reference_fetch_timeout_s=1.0)
    assert "timed out after 1 s" in refused(https_server.url("/slow.wav", host="localhost"), slow)


# --- the three forms -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["ftp://example.com/a.wav", "file:///etc/passwd", "s3://bucket/key.wav", "en woman", "héllo"]
)
def test_other_values_are_refused_with_the_allowed_forms(settings: Settings, value: str) -> None:
    message = refused(value, settings, status=400)
    assert "a preset voice name such as 'en_woman'" in message
    assert "'data:audio/<type>;base64,<payload>' URI" in message
    assert "an https:// URL" in message


def test_the_field_name_given_by_the_caller_leads_the_message(settings: Settings) -> None:
    with pytest.raises(
        UnknownVoiceError, match=r"^speakers\[1\]\.ref_audio: no saved voice or preset voice named 'nope'$"
    ):
        resolve_reference("nope", None, field="speakers[1].ref_audio", settings=settings)
