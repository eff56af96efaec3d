"""The release workflow: a v*.*.* tag runs the tests and the image workflow's checks (reused, not copied),
pushes ghcr.io/<owner>/<repo>:<version>, then creates the GitHub release naming the image and its digest.
actionlint and GitHub's schema check it in test_image_and_workflows.py; this checks what it promises."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.workflows import WORKFLOWS, workflow


def test_a_version_tag_and_nothing_else_starts_a_release() -> None:
    flow = workflow("release.yml")
    assert flow["on"] == {"push": {"tags": ["v*.*.*"]}}
    assert flow["permissions"] == {"contents": "read"}, "write only where the release is created"
    assert flow["concurrency"]["cancel-in-progress"] is False, "a release is never cancelled half-way"


def test_tags_go_through_the_release_alone() -> None:
    """The image and test workflows no longer trigger on tags themselves, so a tag builds once."""
    assert "tags" not in workflow("image.yml")["on"]["push"]
    assert workflow("tests.yml")["on"]["push"] == {"branches": ["**"]}


def test_the_release_reuses_the_test_and_image_workflows_in_order() -> None:
    jobs = workflow("release.yml")["jobs"]
    assert jobs["tests"]["uses"] == "./.github/workflows/tests.yml"
    assert jobs["image"]["uses"] == "./.github/workflows/image.yml"
    assert jobs["image"]["needs"] == "tests" and jobs["image"]["with"] == {"push": True}
    assert jobs["image"]["permissions"]["packages"] == "write"
    assert jobs["release"]["needs"] == "image"
    assert jobs["release"]["permissions"] == {"contents": "write"}
    for name in ("image.yml", "tests.yml"):
        assert "workflow_call" in workflow(name)["on"], f"{name} must be callable"


def test_the_image_workflow_hands_back_the_pushed_reference() -> None:
    flow = workflow("image.yml")
    outputs = flow["on"]["workflow_call"]["outputs"]
    assert {name: spec["value"] for name, spec in outputs.items()} == {
        "image": "${{ jobs.image.outputs.image }}",
        "version": "${{ jobs.image.outputs.version }}",
        "digest": "${{ jobs.image.outputs.digest }}",
    }
    job = flow["jobs"]["image"]
    assert job["outputs"]["digest"] == "${{ steps.push.outputs.digest }}"
    assert job["outputs"]["version"] == "${{ steps.meta.outputs.version }}"
    push = next(step for step in job["steps"] if step.get("id") == "push")
    assert push["with"]["push"] is True
    tags = next(step for step in job["steps"] if step.get("id") == "meta")["with"]["tags"]
    assert "type=semver,pattern={{version}}" in tags, "v1.2.3 must publish :1.2.3"


def release_script() -> str:
    (step,) = workflow("release.yml")["jobs"]["release"]["steps"]
    return step["run"]


def run_release_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str], str]:
    """The release step's script for real, with `gh` replaced by a recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gh-calls"
    gh = bin_dir / "gh"
    gh.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$GH_CALLS"\n'
        'while (($#)); do [[ "$1" == --notes-file ]] && cp "$2" "$GH_CALLS.notes"; shift; done\n'
    )
    gh.chmod(0o755)
    script = tmp_path / "release.sh"
    script.write_text(release_script())
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "GH_CALLS": str(calls),
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_REPOSITORY": "someone/higgs-audio-runpod-worker",
        **env,
    }
    result = subprocess.run(
        ["bash", "-eo", "pipefail", str(script)], env=full_env, capture_output=True, text=True
    )
    args = calls.read_text().splitlines() if calls.exists() else []
    notes = Path(f"{calls}.notes").read_text() if Path(f"{calls}.notes").exists() else ""
    return result, args, notes


DIGEST = "sha256:" + "ab" * 32
IMAGE = "ghcr.io/someone/higgs-audio-runpod-worker"


def test_the_release_names_the_image_and_its_digest(tmp_path: Path) -> None:
    result, args, notes = run_release_script(
        tmp_path, TAG="v1.2.3", IMAGE=IMAGE, VERSION="1.2.3", DIGEST=DIGEST
    )
    assert result.returncode == 0, result.stderr
    assert args[:3] == ["release", "create", "v1.2.3"]
    assert {"--verify-tag", "--generate-notes"} <= set(args) and "--prerelease" not in args
    assert f"`{IMAGE}:1.2.3`" in notes and f"`{IMAGE}@{DIGEST}`" in notes


def test_a_pre_release_tag_makes_a_pre_release(tmp_path: Path) -> None:
    result, args, _ = run_release_script(
        tmp_path, TAG="v1.3.0-rc.1", IMAGE=IMAGE, VERSION="1.3.0-rc.1", DIGEST=DIGEST
    )
    assert result.returncode == 0, result.stderr
    assert "--prerelease" in args


def test_no_release_without_a_pushed_image(tmp_path: Path) -> None:
    result, args, _ = run_release_script(tmp_path, TAG="v1.2.3", IMAGE=IMAGE, VERSION="1.2.3", DIGEST="")
    assert result.returncode == 1 and args == []
    assert "no version or digest" in result.stdout


def test_the_release_holds_no_secret_but_the_github_token() -> None:
    text = (WORKFLOWS / "release.yml").read_text()
    assert set(re.findall(r"secrets\.(\w+)", text)) == {"GITHUB_TOKEN"}
