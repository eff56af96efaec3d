"""The RunPod Hub listing (.runpod/) against RunPod's published format, the worker's settings and the rest of
the deployment: the schema, every env key read by something real, defaults the worker accepts, the CUDA
versions the runtime's torch wheels need, and the model revisions pinned in one place.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing

from higgs_worker import settings as settings_module
from higgs_worker.errors import SettingsError
from higgs_worker.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
HUB_DIR = REPO / ".runpod"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
ENDPOINT = REPO / "deploy" / "endpoint.json"

# The CUDA each torch release's PyPI wheels are built for, and the lowest driver that runs them (read from the
# wheels' metadata: DESIGN §7). Moving torch in requirements/runtime.txt means adding its row here first.
TORCH_CUDA = {"2.9.1": ("12.8", 570), "2.11.0": ("13.0", 580)}
# CUDA versions RunPod hosts report (major.minor, oldest first). RunPod matches allowedCudaVersions exactly,
# so the listing names every one at or above the runtime's floor: a newer driver runs older CUDA wheels.
CUDA_RELEASES = (
    "12.0",
    "12.1",
    "12.2",
    "12.3",
    "12.4",
    "12.5",
    "12.6",
    "12.7",
    "12.8",
    "12.9",
    "13.0",
    "13.1",
    "13.2",
)

# Variables in hub.json that the worker's settings do not read, and the library that does (each is checked
# below by asking that library, not by trusting this table).
READ_ELSEWHERE = {
    "HF_TOKEN": "huggingface_hub",
    "AWS_ACCESS_KEY_ID": "boto3",
    "AWS_SECRET_ACCESS_KEY": "boto3",
    "AWS_DEFAULT_REGION": "boto3",
    "AWS_ENDPOINT_URL": "boto3",
    "RUNPOD_LOG_LEVEL": "runpod SDK",
}
# Form defaults that differ from the worker's own on purpose: a Hub user wants the models loaded before the
# first job, a local run does not.
DELIBERATE_DEFAULTS = {"PRELOAD_MODELS"}


def load(name: str) -> dict[str, Any]:
    return json.loads((HUB_DIR / name).read_text())


def validator(name: str) -> jsonschema.protocols.Validator:
    resources = [
        (path.name, referencing.Resource.from_contents(json.loads(path.read_text())))
        for path in SCHEMAS.glob("*.schema.json")
    ]
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)


def hub_env() -> list[dict[str, Any]]:
    return load("hub.json")["config"]["env"]


def inputs() -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry["input"] for entry in hub_env() if "input" in entry}


def as_env_value(value: Any, spec: Mapping[str, Any]) -> str:
    """What RunPod puts in the environment for a form value."""
    if isinstance(value, bool):
        return spec.get("trueValue", "true") if value else spec.get("falseValue", "false")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every name it was asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_names() -> set[str]:
    env = RecordingEnv()
    load_settings(env)
    return env.asked


def runtime_torch() -> str:
    for line in (REPO / "requirements" / "runtime.txt").read_text().splitlines():
        match = re.fullmatch(r"torch==([\w.+]+)", line.split("#")[0].strip())
        if match:
            return match.group(1)
    raise AssertionError("requirements/runtime.txt pins no torch==")


def required_cuda() -> str:
    torch = runtime_torch()
    assert torch in TORCH_CUDA, (
        f"torch {torch} is not in TORCH_CUDA: look up the CUDA its PyPI wheel needs (nvidia-cuda-runtime / "
        "cuda-toolkit in its metadata) and add a row; then the listing and the endpoint follow"
    )
    return TORCH_CUDA[torch][0]


def cuda_key(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


# --- the format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "schema"),
    [("hub.json", "runpod-hub.schema.json"), ("tests.json", "runpod-hub-tests.schema.json")],
)
def test_listing_files_match_the_published_format(name: str, schema: str) -> None:
    errors = sorted(validator(schema).iter_errors(load(name)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda hub: hub.pop("category"),
        lambda hub: hub.update(category="speech"),
        lambda hub: hub["config"].pop("gpuIds"),
        lambda hub: hub["config"].update(gpuID="ADA_24"),
        lambda hub: hub["config"]["env"].append(
            {"key": "X", "input": {"name": "X", "type": "secret", "description": "x"}}
        ),
        lambda hub: hub["config"]["env"].append(
            {"key": "X", "input": {"name": "X", "type": "number", "description": "x", "default": "1"}}
        ),
        lambda hub: hub["config"]["env"].append({"key": "X", "value": 1}),
        lambda hub: hub["config"].update(allowedCudaVersions=["12"]),
    ],
)
def test_the_schema_rejects_what_the_guide_does_not_allow(breakage: Any) -> None:
    hub = copy.deepcopy(load("hub.json"))
    breakage(hub)
    assert not validator("runpod-hub.schema.json").is_valid(hub)


def test_the_hub_builds_our_dockerfile_and_finds_our_handler_without_copies() -> None:
    """The Hub looks in .runpod/ first and builds with the repository root as context (Hub repos' own
    .runpod/Dockerfiles COPY paths like `.runpod/src`): links to the real files keep one recipe."""
    for name, target in (("Dockerfile", "Dockerfile.runpod.ultra"), ("handler.py", "serverless_handler.py")):
        link = HUB_DIR / name
        assert link.is_symlink(), f".runpod/{name} must link to {target}, not copy it"
        assert os.readlink(link) == f"../{target}", "a relative link inside the repository survives a clone"
        assert link.resolve() == (REPO / target).resolve()
    assert not (REPO / "Dockerfile").exists(), "a root Dockerfile would be a second recipe"


# --- env keys: read by something real, with defaults the worker takes ---------------------------------------


def test_every_env_key_is_read_by_the_worker_or_a_named_library() -> None:
    read_by_settings = settings_names()
    assert {"MODEL_REPO", "MODEL_REVISION", "CONCURRENCY"} <= read_by_settings  # the recording works
    assert not set(READ_ELSEWHERE) & read_by_settings, "listed as read elsewhere, yet settings read it"
    for config in (load("hub.json")["config"], load("tests.json")["config"]):
        for entry in config.get("env", []):
            assert entry["key"] in read_by_settings | set(READ_ELSEWHERE), f"nothing reads {entry['key']}"


def test_the_users_settings_are_in_the_form() -> None:
    form = inputs()
    visible = (
        "MODEL_REPO", "MODEL_REVISION", "TOKENIZER_REPO", "TOKENIZER_REVISION", "HF_TOKEN", "S3_BUCKET",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "STREAMING", "CONCURRENCY",
    )  # fmt: skip
    for key in visible:
        assert key in form and not form[key].get("advanced", False), f"{key} must be a visible input"
    for key in ("MODEL_REPO", "TOKENIZER_REPO"):
        assert form[key]["type"] == "huggingface"
    for key in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "default" not in form[key], f"{key} must never carry a value in the listing"
        assert "RUNPOD_SECRET_" in form[key]["description"], f"{key} should point to RunPod secrets"
    shown = [key for key, spec in form.items() if not spec.get("advanced", False)]
    assert len(shown) <= 12, "keep the form short: the rest is advanced"


def test_hub_defaults_are_accepted_and_equal_the_workers_own(tmp_path: Path) -> None:
    base = {"RUNPOD_VOLUME_PATH": str(tmp_path)}
    names = settings_names()
    env = dict(base)
    for key, spec in inputs().items():
        if key in names and "default" in spec and key not in DELIBERATE_DEFAULTS:
            env[key] = as_env_value(spec["default"], spec)
    assert load_settings(env) == load_settings(base), "a form default differs from what the worker would use"
    for key in DELIBERATE_DEFAULTS:
        load_settings({**base, key: as_env_value(inputs()[key]["default"], inputs()[key])})


def test_every_value_the_form_can_offer_is_accepted(tmp_path: Path) -> None:
    names = settings_names()
    checked = 0
    for key, spec in inputs().items():
        if key not in names:
            continue
        values: list[Any] = [option["value"] for option in spec.get("options", [])]
        values += [spec[bound] for bound in ("min", "max") if bound in spec]
        if spec["type"] == "boolean":
            values += [True, False]
        for value in values:
            try:
                load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path), key: as_env_value(value, spec)})
            except SettingsError as error:
                pytest.fail(f"{key}={value!r} is offered by the form but refused by the worker: {error}")
            checked += 1
    assert checked >= 10


def test_a_value_below_a_forms_minimum_is_what_the_worker_refuses(tmp_path: Path) -> None:
    """The form's `min` is the worker's own floor, not a looser one (the check above could not see that)."""
    for key, spec in inputs().items():
        if spec["type"] == "number" and "min" in spec and spec["min"] > 0:
            with pytest.raises(SettingsError, match=key):
                load_settings({"RUNPOD_VOLUME_PATH": str(tmp_path), key: as_env_value(spec["min"] - 1, spec)})


def test_presets_set_only_form_inputs_to_values_the_worker_accepts(tmp_path: Path) -> None:
    form = inputs()
    for preset in load("hub.json")["config"]["presets"]:
        env = {"RUNPOD_VOLUME_PATH": str(tmp_path)}
        for key, value in preset["defaults"].items():
            assert key in form, f"preset {preset['name']!r} sets {key}, which is not a form input"
            env[key] = as_env_value(value, form[key])
        load_settings(env)


def test_variables_read_elsewhere_are_read_by_those_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment0000000000")
    assert huggingface_hub.get_token() == "hf_fromtheenvironment0000000000"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    session = boto3.Session()
    credentials = session.get_credentials()
    assert (credentials.access_key, credentials.secret_key) == ("AKIDFROMENV", "secret-from-env")
    assert session.region_name == "eu-west-3"
    assert session.client("s3").meta.endpoint_url == "http://127.0.0.1:9"
    # The SDK reads its level once, at import: ask a fresh interpreter.
    probe = "from runpod.serverless.modules.rp_logger import RunPodLogger; print(RunPodLogger().level)"
    level = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "RUNPOD_LOG_LEVEL": "WARN"},
        capture_output=True,
        text=True,
    )
    assert level.stdout.strip() == "WARN", level.stderr


# --- one fact, one place ------------------------------------------------------------------------------------


def test_revisions_and_repos_come_from_the_settings_constants() -> None:
    """Pinning is one line in higgs_worker/settings.py; this test names every other place to change."""
    form = inputs()
    endpoint_env = json.loads(ENDPOINT.read_text())["env"]
    readme = (REPO / "README.md").read_text()
    defaults = settings_module
    for repo_key, revision_key, repo, revision in (
        ("MODEL_REPO", "MODEL_REVISION", defaults.DEFAULT_MODEL_REPO, defaults.DEFAULT_MODEL_REVISION),
        (
            "TOKENIZER_REPO",
            "TOKENIZER_REVISION",
            defaults.DEFAULT_TOKENIZER_REPO,
            defaults.DEFAULT_TOKENIZER_REVISION,
        ),
    ):
        assert form[repo_key]["default"] == endpoint_env[repo_key] == repo
        assert form[revision_key]["default"] == revision, f".runpod/hub.json {revision_key}"
        assert endpoint_env[revision_key] == revision, f"deploy/endpoint.json {revision_key}"
        assert f"| `{repo_key}`, `{revision_key}` | `{repo}`, `{revision}` |" in readme, (
            f"README {revision_key}"
        )


def test_a_pinned_revision_is_a_branch_or_a_full_commit() -> None:
    for revision in (settings_module.DEFAULT_MODEL_REVISION, settings_module.DEFAULT_TOKENIZER_REVISION):
        assert revision == "main" or re.fullmatch(r"[0-9a-f]{40}", revision), (
            f"{revision!r}: pin a full 40-hex commit (a short one is ambiguous to the hub)"
        )


def test_cuda_versions_follow_the_runtimes_torch_wheels() -> None:
    floor = required_cuda()
    expected = [v for v in CUDA_RELEASES if cuda_key(v) >= cuda_key(floor)]
    assert load("hub.json")["config"]["allowedCudaVersions"] == expected
    assert load("tests.json")["config"]["allowedCudaVersions"] == expected
    assert json.loads(ENDPOINT.read_text())["gpu"]["minCudaVersion"] == floor


def test_the_listing_runs_on_the_endpoints_gpu_pools() -> None:
    hub = load("hub.json")["config"]
    endpoint = json.loads(ENDPOINT.read_text())["gpu"]
    assert hub["gpuIds"].split(",") == endpoint["pools"]
    assert hub["gpuCount"] == endpoint["count"] == load("tests.json")["config"]["gpuCount"] == 1


def test_the_container_disk_holds_runtime_and_models_without_a_volume() -> None:
    """Hub tests run without a network volume, so bootstrap.sh installs the runtime and the store downloads
    the models onto the container disk: it needs what bootstrap asks of a volume, plus room to unpack."""
    match = re.search(r"^MIN_FREE_GB=(\d+)", (REPO / "bootstrap.sh").read_text(), re.MULTILINE)
    assert match, "bootstrap.sh no longer states MIN_FREE_GB"
    assert load("hub.json")["config"]["containerDiskInGb"] >= int(match.group(1)) + 10


def test_tests_cover_the_promised_jobs_with_cold_start_timeouts() -> None:
    """A cold start without a volume installs the runtime (2-5 min), downloads ~12 GB and loads the model;
    the Hub may run each test on a fresh worker, so every timeout covers it, within the endpoint's own."""
    tests = load("tests.json")["tests"]
    jobs = [test["input"] for test in tests]
    assert any(set(job) <= {"transcript", "max_new_tokens", "seed"} for job in jobs), "a plain job"
    assert any("ref_audio" in job for job in jobs), "a preset voice"
    assert any({"output_format", "sample_rate"} <= set(job) for job in jobs), "a format and rate change"
    execution_timeout_ms = json.loads(ENDPOINT.read_text())["timeout"]
    for test in tests:
        assert 20 * 60_000 <= test["timeout"] <= execution_timeout_ms, test["name"]
