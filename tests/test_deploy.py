"""deploy/deploy.py against a loopback stand-in for RunPod's REST API v2.

The stand-in checks what RunPod would: method, path, bearer token, and that the body validates against the
spec's request schema (with its own validator, not the command's). It answers with spec-shaped endpoints and
problem+json errors. The command runs as a real subprocess, as an operator would run it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from higgs_worker.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "deploy.py"
ENDPOINT_FILE = REPO / "deploy" / "endpoint.json"
SPEC = json.loads((REPO / "deploy" / "runpod-rest-v2.openapi.json").read_text())
API_KEY = "rpa_TESTKEY0123456789"
FILLS = ["--owner", "Acme", "--volume-id", "vol7x2k", "--data-center", "EU-RO-1"]
# Serverless pools whose GPUs have at least 24 GB.
POOLS_24GB_PLUS = {"ADA_24", "AMPERE_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"}


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource("urn:spec", DRAFT202012.create_resource(SPEC))
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:spec#/components/schemas/{name}"}, registry=registry
    )


def schema_errors(document: Any, name: str) -> list[str]:
    return [error.message for error in schema_validator(name).iter_errors(document)]


@dataclass
class FakeRunPod:
    """What the stand-in received, and an optional canned error to answer with."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    error: tuple[int, dict[str, Any]] | None = None
    base: str = ""
    existing_type: str = "QUEUE"  # the type of the endpoint a PATCH updates (its body cannot say)

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any]]:
        self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        if headers.get("Authorization") != f"Bearer {API_KEY}":
            return 401, {"title": "Unauthorized", "status": 401, "detail": "invalid bearer token"}
        if self.error:
            return self.error
        if method == "POST" and path == "/v2/serverless":
            schema, status, endpoint_id = "CreateEndpointRequest", 201, "4m7x2k9q"
        elif method == "PATCH" and (match := re.fullmatch(r"/v2/serverless/(\w+)", path)):
            schema, status, endpoint_id = "UpdateEndpointRequest", 200, match.group(1)
        else:
            return 404, {"title": "Not Found", "status": 404, "detail": f"no route {method} {path}"}
        errors = schema_errors(body, schema)
        if errors:
            return 422, {
                "title": "Unprocessable Entity",
                "status": 422,
                "detail": "invalid body",
                "errors": errors,
            }
        return status, endpoint_response(endpoint_id, {"type": self.existing_type, **body})


def endpoint_response(endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
    urls = "https://api.runpod.ai/v2/" + endpoint_id
    response = {
        "id": endpoint_id,
        "createdAt": "2026-11-23T10:00:00Z",
        "args": "",
        "registry": None,
        "ports": [],
        **body,
        "gpu": {"allowedCudaVersions": [], **body["gpu"]},
        "requestUrls": {
            "run": f"{urls}/run",
            "runSync": f"{urls}/runsync",
            "status": f"{urls}/status/{{job_id}}",
            "stream": f"{urls}/stream/{{job_id}}",
            "cancel": f"{urls}/cancel/{{job_id}}",
            "retry": f"{urls}/retry/{{job_id}}",
            "purgeQueue": f"{urls}/purge-queue",
            "health": f"{urls}/health",
        },
    }
    if body["type"] == "LOAD_BALANCER":
        base = f"https://{endpoint_id}.api.runpod.ai"
        response["requestUrls"] = {"base": base, "health": base + body["env"]["HEALTH_CHECK_PATH"]}
    assert schema_errors(response, "Endpoint") == [], "the stand-in must answer what the spec promises"
    return response


@pytest.fixture
def runpod_api() -> Iterator[FakeRunPod]:
    fake = FakeRunPod()

    class Handler(BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, payload = fake.answer(
                self.command, self.path, dict(self.headers), json.loads(raw or b"null")
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            kind = "application/json" if status < 400 else "application/problem+json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_PATCH = do_GET = handle_any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


def deploy(*args: str, api: FakeRunPod | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": "/usr/bin:/bin",
        "RUNPOD_API_BASE": api.base if api else "http://127.0.0.1:9",
        **env,
    }
    return subprocess.run(
        [sys.executable, str(DEPLOY), *args], capture_output=True, text=True, env=environment
    )


def filled_endpoint() -> dict[str, Any]:
    text = ENDPOINT_FILE.read_text()
    for placeholder, value in {
        "${GITHUB_OWNER}": "acme", "${NETWORK_VOLUME_ID}": "vol7x2k", "${DATA_CENTER_ID}": "EU-RO-1",
        "${GITHUB_REPO:-higgs-audio-runpod-worker}": "higgs-audio-runpod-worker",
        "${IMAGE_TAG:-latest}": "latest", "${AWS_DEFAULT_REGION:-us-east-1}": "us-east-1",
    }.items():  # fmt: skip
        text = text.replace(placeholder, value)
    assert "${" not in text, "every placeholder in endpoint.json is listed here"
    return json.loads(text)


def test_create_posts_a_valid_body_with_the_bearer_key_and_prints_the_run_url(runpod_api: FakeRunPod) -> None:
    result = deploy(*FILLS, "--image-tag", "v1.2.0", api=runpod_api, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 0, result.stderr
    (request,) = runpod_api.requests
    assert (request["method"], request["path"]) == ("POST", "/v2/serverless")
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert schema_errors(request["body"], "CreateEndpointRequest") == []
    body = request["body"]
    assert body["image"] == "ghcr.io/acme/higgs-audio-runpod-worker:v1.2.0"
    assert body["networkVolumes"] == ["vol7x2k"] and body["dataCenterIds"] == ["EU-RO-1"]
    assert "endpoint created: 4m7x2k9q" in result.stdout
    assert "run URL: https://api.runpod.ai/v2/4m7x2k9q/run" in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_values_come_from_the_environment_when_no_flag_is_given(runpod_api: FakeRunPod) -> None:
    env = {
        "GITHUB_OWNER": "acme",
        "NETWORK_VOLUME_ID": "volenv",
        "DATA_CENTER_ID": "US-KS-2",
        "IMAGE_TAG": "sha-1",
    }

    result = deploy(api=runpod_api, RUNPOD_API_KEY=API_KEY, **env)

    assert result.returncode == 0, result.stderr
    body = runpod_api.requests[0]["body"]
    assert body["image"].endswith("/acme/higgs-audio-runpod-worker:sha-1") and body["networkVolumes"] == [
        "volenv"
    ]


def test_update_patches_the_endpoint_without_the_immutable_type(runpod_api: FakeRunPod) -> None:
    result = deploy(*FILLS, "--endpoint-id", "ep9q", api=runpod_api, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 0, result.stderr
    (request,) = runpod_api.requests
    assert (request["method"], request["path"]) == ("PATCH", "/v2/serverless/ep9q")
    assert "type" not in request["body"]
    assert schema_errors(request["body"], "UpdateEndpointRequest") == []
    assert "endpoint updated: ep9q" in result.stdout and "https://api.runpod.ai/v2/ep9q/run" in result.stdout


def test_dry_run_prints_the_request_and_sends_nothing(runpod_api: FakeRunPod) -> None:
    result = deploy(*FILLS, "--dry-run", api=runpod_api)

    assert result.returncode == 0, result.stderr
    assert runpod_api.requests == []
    first_line, _, body = result.stdout.partition("\n")
    assert first_line == f"POST {runpod_api.base}/v2/serverless"
    assert json.loads(body) == filled_endpoint()


def test_a_missing_api_key_is_an_error_and_nothing_is_sent(runpod_api: FakeRunPod) -> None:
    result = deploy(*FILLS, api=runpod_api)

    assert result.returncode == 1
    assert "RUNPOD_API_KEY is not set" in result.stderr
    assert runpod_api.requests == []


def test_unfilled_placeholders_are_all_listed_with_how_to_fill_them(runpod_api: FakeRunPod) -> None:
    result = deploy("--owner", "acme", "--dry-run", api=runpod_api)

    assert result.returncode == 1
    assert "unfilled placeholders" in result.stderr
    assert "DATA_CENTER_ID (--data-center or $DATA_CENTER_ID)" in result.stderr
    assert "NETWORK_VOLUME_ID (--volume-id or $NETWORK_VOLUME_ID)" in result.stderr
    assert "GITHUB_OWNER" not in result.stderr


def test_api_errors_show_the_title_detail_and_violations(runpod_api: FakeRunPod) -> None:
    runpod_api.error = (
        400,
        {"title": "Bad Request", "status": 400, "detail": "network volume vol7x2k is in another data center",
         "errors": ["$.dataCenterIds: must match the volume"]},
    )  # fmt: skip

    result = deploy(*FILLS, api=runpod_api, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 1
    assert (
        "RunPod API error 400 Bad Request: network volume vol7x2k is in another data center" in result.stderr
    )
    assert "$.dataCenterIds: must match the volume" in result.stderr
    assert "endpoint created" not in result.stdout


def test_a_rejected_key_shows_the_apis_answer_without_the_key(runpod_api: FakeRunPod) -> None:
    result = deploy(*FILLS, api=runpod_api, RUNPOD_API_KEY="rpa_WRONG")

    assert result.returncode == 1
    assert "RunPod API error 401 Unauthorized: invalid bearer token" in result.stderr
    assert "rpa_WRONG" not in result.stdout + result.stderr


def test_an_unreachable_api_is_reported(tmp_path: Path) -> None:
    result = deploy(*FILLS, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 1
    assert "could not reach http://127.0.0.1:9/v2/serverless" in result.stderr


def test_a_body_the_spec_rejects_is_stopped_before_sending(runpod_api: FakeRunPod, tmp_path: Path) -> None:
    endpoint = filled_endpoint() | {"gpuIds": "AMPERE_24"}  # a v1 field: v2 rejects unknown keys
    endpoint["workers"]["idleTimeout"] = 0
    broken = tmp_path / "endpoint.json"
    broken.write_text(json.dumps(endpoint))

    result = deploy("--file", str(broken), api=runpod_api, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 1
    assert "does not match RunPod's CreateEndpointRequest" in result.stderr
    assert "gpuIds" in result.stderr and "workers/idleTimeout" in result.stderr
    assert runpod_api.requests == []


def test_a_literal_secret_in_the_endpoint_is_refused(runpod_api: FakeRunPod, tmp_path: Path) -> None:
    endpoint = filled_endpoint()
    endpoint["env"]["HF_TOKEN"] = "hf_abcdefSECRET"
    leaky = tmp_path / "endpoint.json"
    leaky.write_text(json.dumps(endpoint))

    result = deploy("--file", str(leaky), "--dry-run", api=runpod_api)

    assert result.returncode == 1
    assert (
        "env HF_TOKEN holds a literal value" in result.stderr
        and "{{ RUNPOD_SECRET_hf_token }}" in result.stderr
    )
    assert "hf_abcdefSECRET" not in result.stdout + result.stderr


def test_the_shipped_endpoint_validates_against_the_v2_spec() -> None:
    assert schema_errors(filled_endpoint(), "CreateEndpointRequest") == []


def test_the_shipped_endpoint_fits_a_cold_higgs_audio_worker() -> None:
    endpoint = filled_endpoint()
    assert endpoint["type"] == "QUEUE"
    assert endpoint["image"] == "ghcr.io/acme/higgs-audio-runpod-worker:latest"
    assert set(endpoint["gpu"]["pools"]) <= POOLS_24GB_PLUS and endpoint["gpu"]["count"] == 1
    assert endpoint["workers"]["min"] == 0 and endpoint["workers"]["max"] >= 1
    assert endpoint["timeout"] >= 1_800_000, "milliseconds: the first request may download ~12 GB"
    assert endpoint["flashboot"] != "OFF"
    assert endpoint["scaling"]["type"] == "QUEUE_DELAY"
    env = endpoint["env"]
    assert env["PRELOAD_MODELS"] == "true" and env["RUNPOD_LOG_LEVEL"] == "INFO"
    assert {"MODEL_REPO", "TOKENIZER_REPO"} <= set(env)


def test_the_shipped_endpoint_only_references_secrets() -> None:
    env = filled_endpoint()["env"]
    for name in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\{\{ RUNPOD_SECRET_\w+ \}\}", env[name]), name
    text = ENDPOINT_FILE.read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|rpa_[A-Za-z0-9]{20,}", text)


# --- the load-balancer endpoint (the HTTP server from the same image) ---------------------------------------


def dry_run_body(*args: str) -> dict[str, Any]:
    result = deploy(*FILLS, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.partition("\n")[2])


def test_create_a_load_balancer_endpoint_posts_a_valid_body_and_prints_its_base_url(
    runpod_api: FakeRunPod,
) -> None:
    result = deploy(*FILLS, "--type", "LOAD_BALANCER", api=runpod_api, RUNPOD_API_KEY=API_KEY)

    assert result.returncode == 0, result.stderr
    (request,) = runpod_api.requests
    assert (request["method"], request["path"]) == ("POST", "/v2/serverless")
    body = request["body"]
    assert schema_errors(body, "CreateEndpointRequest") == []
    assert body["type"] == "LOAD_BALANCER"
    assert body["scaling"]["type"] == "REQUEST_COUNT", "the spec allows no other scaler for this type"
    assert body["ports"] == ["80/http"]
    env = body["env"]
    assert (env["ENDPOINT_TYPE"], env["PORT"], env["PORT_HEALTH"], env["HEALTH_CHECK_PATH"]) == (
        "LOAD_BALANCER", "80", "80", "/ping",
    )  # fmt: skip
    assert "endpoint created: 4m7x2k9q" in result.stdout
    assert "base URL: https://4m7x2k9q.api.runpod.ai" in result.stdout
    assert "run URL" not in result.stdout


def test_the_load_balancer_endpoint_differs_from_the_queue_one_only_where_it_must() -> None:
    queue = dry_run_body()
    balancer = dry_run_body("--type", "LOAD_BALANCER")

    differing = {key for key in queue.keys() | balancer.keys() if queue.get(key) != balancer.get(key)}
    assert differing == {"name", "type", "scaling", "ports", "env"}
    added = {key: value for key, value in balancer["env"].items() if queue["env"].get(key) != value}
    assert set(added) == {"ENDPOINT_TYPE", "PORT", "PORT_HEALTH", "HEALTH_CHECK_PATH"}
    assert queue["env"].items() <= balancer["env"].items(), "secrets, models and region are shared"
    assert queue["name"] != balancer["name"], "both kinds can live in one account"


def test_the_load_balancer_endpoint_starts_the_worker_as_an_http_server_on_the_exposed_ports() -> None:
    endpoint = dry_run_body("--type", "LOAD_BALANCER")
    settings = load_settings(endpoint["env"])  # what the worker reads from the endpoint's environment

    assert settings.endpoint_type == "LOAD_BALANCER"
    assert {f"{settings.port}/http", f"{settings.port_health}/http"} == set(endpoint["ports"])
    assert settings.health_path == "/ping", "RunPod polls /ping unless HEALTH_CHECK_PATH says otherwise"
    assert endpoint["scaling"]["requestCount"] <= settings.concurrency, (
        "scale out before the worker's slots are full: a load balancer has no queue, the excess gets 503"
    )


def test_update_of_a_load_balancer_endpoint_patches_without_the_type(runpod_api: FakeRunPod) -> None:
    runpod_api.existing_type = "LOAD_BALANCER"

    result = deploy(
        *FILLS, "--type", "LOAD_BALANCER", "--endpoint-id", "lb7q", api=runpod_api, RUNPOD_API_KEY=API_KEY
    )

    assert result.returncode == 0, result.stderr
    (request,) = runpod_api.requests
    assert (request["method"], request["path"]) == ("PATCH", "/v2/serverless/lb7q")
    assert "type" not in request["body"] and request["body"]["ports"] == ["80/http"]
    assert schema_errors(request["body"], "UpdateEndpointRequest") == []
    assert (
        "endpoint updated: lb7q" in result.stdout and "base URL: https://lb7q.api.runpod.ai" in result.stdout
    )


def test_a_separate_health_port_is_exposed_too() -> None:
    exposed_ports = load_deploy_module().exposed_ports

    assert exposed_ports({"PORT": "8000", "PORT_HEALTH": "8001"}) == ["8000/http", "8001/http"]
    assert exposed_ports({"PORT": "8000", "PORT_HEALTH": "8000"}) == ["8000/http"]


def test_a_load_balancer_endpoint_without_both_ports_is_refused() -> None:
    deploy_module = load_deploy_module()
    endpoint = filled_endpoint()
    overlay = {"type": "LOAD_BALANCER", "env": {"PORT": "8000"}}

    with pytest.raises(deploy_module.DeployError, match=r"must set env PORT_HEALTH"):
        deploy_module.with_variant(endpoint, overlay)


def test_the_load_balancer_endpoint_needs_a_request_count_scaler_per_the_spec() -> None:
    """The spec's own rule, checked here so the overlay cannot silently inherit the queue's scaler."""
    endpoint = dry_run_body("--type", "LOAD_BALANCER")

    assert schema_errors(
        endpoint | {"scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}, "CreateEndpointRequest"
    )


def load_deploy_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_under_test", DEPLOY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
