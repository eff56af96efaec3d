"""The house's rules, as imports: the doors only translate and do not know each other, the plumbing knows
no door, and the speech engine knows neither the plumbing nor a door. ``serverless_handler.py`` composes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package → the packages of ours it must never import
FORBIDDEN = {
    "boson_multimodal": {"higgs_worker", "http_api", "queue_api", "serverless_handler", "runpod", "fastapi"},
    "higgs_worker": {"http_api", "queue_api", "serverless_handler", "runpod", "fastapi", "uvicorn"},
    "http_api": {"queue_api", "serverless_handler", "runpod"},
    "queue_api": {"http_api", "serverless_handler", "fastapi", "uvicorn"},
}


def imported(path: Path) -> set[str]:
    """The top-level package of every import in ``path``, wherever in the file it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_it_must_not_know(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported(path) & FORBIDDEN[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_composition_root_starts_either_door_and_nothing_else_starts_one() -> None:
    assert {"queue_api", "http_api", "higgs_worker"} <= imported(ROOT / "serverless_handler.py")
    for package in FORBIDDEN:
        for path in (ROOT / package).rglob("*.py"):
            assert "serverless_handler" not in imported(path), path


def test_no_test_imports_another_test_module_or_the_conftest() -> None:
    """What tests share lives in tests/support; fixtures reach tests through conftest.py, never an import."""
    tests = ROOT / "tests"
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                last = name.split(".")[-1]
                assert not (last.startswith("test_") or last == "conftest"), f"{path.name} imports {name}"
