"""The HTTP door (ENDPOINT_TYPE=LOAD_BALANCER) as clients see it: a real worker process serving uvicorn on
loopback with the tiny model, driven by the official ``openai`` package and by plain HTTP (httpx)."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from openai import BadRequestError, OpenAI

from tests.support.hub_server import HubServer
from tests.support.worker_process import HttpWorker, worker_env

RATE = 24_000
HOP = 960
JOB = {"model": "higgs-audio-v2", "input": "Hello over HTTP.", "max_new_tokens": 40, "seed": 3}


@pytest.fixture(scope="module")
def server(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpWorker]:
    root = tmp_path_factory.mktemp("http")
    env = worker_env(
        root / "volume",
        hub.url,
        CONCURRENCY="1",
        MAX_REQUEST_BYTES="262144",
        VOICES_BASE_URL=f"{hub.url}/voices",  # it has no presets (404): only saved voices exist
    )
    with HttpWorker(env, root / "worker.log") as worker:
        yield worker


@pytest.fixture(scope="module")
def client(server: HttpWorker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def narrator(client: httpx.Client, spoken_reference: Path) -> str:
    files = {"file": ("ref.wav", spoken_reference.read_bytes(), "audio/wav")}
    data = {"name": "narrator", "ref_text": "The quick brown fox jumps over the lazy dog."}
    response = client.post("/v1/audio/voices", data=data, files=files)
    assert response.status_code == 201, response.text
    return "narrator"


def decoded_seconds(fmt: str, data: bytes) -> float:
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return len(data) / 2 / RATE
    samples = sum(len(block) for block in sf.blocks(io.BytesIO(data), blocksize=4096, frames=-1))
    return samples / RATE


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if param is not None:
        assert error["message"].startswith(f"{param}:"), error
    return error["message"]


def test_ping_answered_204_while_preparing_then_200(server: HttpWorker) -> None:
    statuses = server.health_statuses
    assert statuses[-1] == 200 and set(statuses[:-1]) == {204}, statuses
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_models_lists_the_model(client: httpx.Client) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [model["id"] for model in data] == ["bosonai/higgs-audio-v2-generation-3B-base"]


def test_every_format_decodes_to_the_same_duration(client: httpx.Client) -> None:
    pcm = client.post("/v1/audio/speech", json=JOB | {"response_format": "pcm"})
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    seconds = decoded_seconds("pcm", pcm.content)
    assert seconds > 0 and round(seconds * RATE) % HOP == 0
    for fmt, mimetype, slack in [
        ("wav", "audio/wav", 0.0),
        ("flac", "audio/flac", 0.0),
        ("ogg", "audio/ogg", 0.0),
        ("opus", "audio/ogg; codecs=opus", 0.0),
        ("mp3", "audio/mpeg", 0.1),  # a streamed MP3 has no gapless tag: encoder delay and padding play too
    ]:
        response = client.post("/v1/audio/speech", json=JOB | {"response_format": fmt})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == mimetype
        assert 0 <= decoded_seconds(fmt, response.content) - seconds <= slack + 1e-3, fmt


def test_audio_streams_in_several_pieces(client: httpx.Client) -> None:
    with client.stream(
        "POST", "/v1/audio/speech", json=JOB | {"response_format": "pcm", "seed": 5}
    ) as response:
        assert response.status_code == 200
        pieces = [piece for piece in response.iter_raw() if piece]
    assert len(pieces) >= 2  # the first chunk (12 frames) leaves before the clip is finished


def test_sse_events_carry_the_audio(client: httpx.Client) -> None:
    pcm = client.post("/v1/audio/speech", json=JOB | {"response_format": "pcm"}).content
    response = client.post("/v1/audio/speech", json=JOB | {"response_format": "pcm", "stream_format": "sse"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm


def test_the_openai_package_works_unchanged(server: HttpWorker, narrator: str) -> None:
    openai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"max_new_tokens": 40, "seed": 2}
    audio = openai.audio.speech.create(
        model="tts-1", voice=narrator, input="Cloned.", response_format="wav", extra_body=extra
    )
    whole = audio.read()
    assert decoded_seconds("wav", whole) > 0
    with openai.audio.speech.with_streaming_response.create(
        model="tts-1", voice=narrator, input="Cloned.", response_format="wav", extra_body=extra
    ) as streamed:
        streamed_bytes = b"".join(streamed.iter_bytes())
    assert decoded_seconds("wav", streamed_bytes) == decoded_seconds("wav", whole)


def test_errors_have_openai_shape_and_name_the_field(client: httpx.Client) -> None:
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"temperature": 9}), 400, "temperature")
    message = assert_openai_error(
        client.post("/v1/audio/speech", json=JOB | {"response_format": "aac"}), 400, "response_format"
    )
    assert "mp3" in message and "pcm" in message
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"voice": "nobody"}), 404, "voice")
    not_audio = "data:audio/wav;base64," + base64.b64encode(b"not audio at all").decode()
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"voice": not_audio}), 422, "voice")
    assert_openai_error(
        client.post("/v1/audio/speech", json=JOB | {"stream_format": "x"}), 400, "stream_format"
    )
    assert_openai_error(client.post("/v1/audio/speech", content=b"{nope"), 400, None)
    assert client.get("/v1/nothing").status_code == 404
    # the route answers with the audio itself: S3 fields would be silently ignored, so they are refused
    message = assert_openai_error(
        client.post("/v1/audio/speech", json=JOB | {"s3_bucket": "clips"}), 400, "s3_bucket"
    )
    assert "POST /generate" in message


def test_errors_name_the_fields_as_an_openai_client_knows_them(
    client: httpx.Client, server: HttpWorker
) -> None:
    """On OpenAI's route a field is named as OpenAI names it, sent or not: never by this worker's own name."""
    without_input = {k: v for k, v in JOB.items() if k != "input"}
    message = assert_openai_error(client.post("/v1/audio/speech", json=without_input), 400, "input")
    assert message == "input: required"
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"input": "   "}), 400, "input")
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"voice": "../x"}), 400, "voice")
    assert_openai_error(client.post("/v1/audio/speech", json=JOB | {"voice": 7}), 400, "voice")
    long_scene = JOB | {"instructions": "x" * 2001}
    assert_openai_error(client.post("/v1/audio/speech", json=long_scene), 400, "instructions")
    # this worker's own names still work on that route, and are then named as sent
    ours = {k: v for k, v in JOB.items() if k != "input"} | {"transcript": "Hi.", "output_format": "flac8"}
    assert_openai_error(client.post("/v1/audio/speech", json=ours), 400, "output_format")
    # the official client sees the same: its error carries OpenAI's field name
    openai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as raised:
        openai.audio.speech.create(
            model="tts-1", voice="../x", input="Hi.", extra_body={"max_new_tokens": 20}
        )
    assert raised.value.status_code == 400 and raised.value.body["param"] == "voice"  # type: ignore[index]


def test_a_body_over_the_limit_is_refused_before_it_is_read(client: httpx.Client) -> None:
    big = JOB | {"input": "x" * 300_000}
    assert_openai_error(client.post("/v1/audio/speech", json=big), 413, None)

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut off once past the limit
        yield b'{"input": "'
        for _ in range(100):
            yield b"y" * 10_000

    response = client.post(
        "/v1/audio/speech", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_voice_library_round_trip(client: httpx.Client, narrator: str, spoken_reference: Path) -> None:
    listed = client.get("/v1/audio/voices").json()["data"]
    assert [v["name"] for v in listed] == [narrator] and listed[0]["source"] == "upload"
    one = client.get(f"/v1/audio/voices/{narrator}").json()
    assert one["ref_text"].startswith("The quick brown fox") and one["duration_s"] > 1
    files = {"file": ("ref.wav", spoken_reference.read_bytes(), "audio/wav")}
    again = client.post("/v1/audio/voices", data={"name": narrator}, files=files)
    assert_openai_error(again, 409, "name")
    bad_name = client.post("/v1/audio/voices", data={"name": "../x"}, files=files)
    assert_openai_error(bad_name, 400, "name")
    not_audio = client.post("/v1/audio/voices", data={"name": "noise"}, files={"file": ("a.wav", b"abc")})
    assert_openai_error(not_audio, 422, "file")
    # a saved voice is usable by name in a queue job's input too (POST /generate)
    output = client.post(
        "/generate",
        json={"input": {"transcript": "Queue style.", "ref_audio": narrator, "max_new_tokens": 20}},
    ).json()
    assert output["status"] == "COMPLETED", output
    assert (
        output["output"]["format"] == "wav"
        and base64.b64decode(output["output"]["audio_base64"])[:4] == b"RIFF"
    )
    replaced = client.post("/v1/audio/voices", data={"name": "temp", "replace": "true"}, files=files)
    assert replaced.status_code == 201
    assert client.delete("/v1/audio/voices/temp").json()["deleted"] is True
    assert_openai_error(client.get("/v1/audio/voices/temp"), 404, "name")


def test_dry_run_over_http_shows_the_reading_without_generating(
    client: httpx.Client, server: HttpWorker
) -> None:
    text = "[SPEAKER0] It is 70°F [laugh] [SPEAKER1] Fine."
    before = server.log.count("generated ")
    speech = client.post("/v1/audio/speech", json={"model": "m", "input": text, "dry_run": True})
    assert speech.status_code == 200 and speech.headers["content-type"].startswith("application/json")
    plan = speech.json()
    assert plan["dry_run"] is True
    assert plan["transcript"] == "[SPEAKER0] It is 70 degrees Fahrenheit <SE>[Laughter]</SE> [SPEAKER1] Fine."
    assert [s["voice"] for s in plan["speakers"]] == ["default", "default"]
    generate = client.post("/generate", json={"input": {"transcript": text, "dry_run": True}})
    assert generate.status_code == 200 and generate.json()["output"] == plan
    bad = client.post("/v1/audio/speech", json={"model": "m", "input": text, "dry_run": True, "top_p": 7})
    assert_openai_error(bad, 400, "top_p")
    assert server.log.count("generated ") == before  # nothing was generated


def test_generate_reports_failures_like_runsync(client: httpx.Client) -> None:
    response = client.post("/generate", json={"input": {"transcript": "hi", "top_p": 7}})
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "FAILED" and body["error"].startswith("top_p:")


def test_overload_is_a_fast_503_and_a_disconnect_frees_the_slot(server: HttpWorker) -> None:
    # Unseeded, so never a cache hit (a hit is answered at once and would give its slot back); the demo model
    # never ends a clip, so it runs to its limit unless stopped.
    unseeded = {k: v for k, v in JOB.items() if k != "seed"}
    long_job = unseeded | {"response_format": "pcm", "max_new_tokens": 4096}
    with (
        httpx.Client(base_url=server.url, timeout=60) as first,
        first.stream("POST", "/v1/audio/speech", json=long_job) as running,
    ):
        assert running.status_code == 200
        # Keep the iterator: a dropped one is closed when collected, and closing it disconnects the client.
        received = running.iter_raw()
        next(received)  # generating now, holding the only slot (CONCURRENCY=1)
        started = time.monotonic()
        busy = httpx.post(f"{server.url}/v1/audio/speech", json=JOB, timeout=30)
        assert time.monotonic() - started < 2
        assert_openai_error(busy, 503, None)
        assert busy.headers["retry-after"] == "1"
    # leaving the block closed the connection mid-stream: the generation stops and the slot frees
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(
            f"{server.url}/v1/audio/speech", json=JOB | {"response_format": "pcm"}, timeout=60
        )
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    # The slot is free as soon as the stream is closed; the scheduler drops the sequence at its next step.
    deadline = time.monotonic() + 30
    while "cancelled after" not in server.log and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cancelled after" in server.log
    assert "generated 4088 frames" not in server.log  # the long one did not run to its end


def test_a_client_leaving_a_whole_file_request_cancels_its_generation_and_frees_the_slot(
    server: HttpWorker,
) -> None:
    """FLAC is sent once complete: nothing is written while it generates, so the door watches for the client
    leaving and cancels the generation in the scheduler; the slot is free as soon as it has stopped."""
    long_job = JOB | {"response_format": "flac", "max_new_tokens": 4096, "seed": 21}  # runs to its limit
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: httpx closes the connection
        httpx.post(f"{server.url}/v1/audio/speech", json=long_job, timeout=httpx.Timeout(60, read=2))

    deadline = time.monotonic() + 120
    while True:  # the only slot (CONCURRENCY=1) comes back once the cancelled generation has stopped
        response = httpx.post(f"{server.url}/v1/audio/speech", json=JOB | {"seed": 22}, timeout=60)
        if response.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    # Only a generation the engine stopped ends as abandoned: one left to run would have finished its clip.
    assert re.search(r"speech-\w+: the client went away; its generation was cancelled", server.log)
    assert "never retrieved" not in server.log and "ERROR" not in server.log
