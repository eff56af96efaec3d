"""The one error hierarchy: every class the shipped code raises is in it, and both doors answer from it."""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import pytest

from higgs_worker import errors

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("higgs_worker", "http_api", "queue_api")
SHIPPED = [ROOT / "serverless_handler.py", ROOT / "demo_model.py"]
SHIPPED += [path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
DEFINED_HERE = {name for name, value in vars(errors).items() if inspect.isclass(value)}
BUILTIN = {name for name, value in vars(builtins).items() if isinstance(value, type)}


def _raised(path: Path) -> set[str]:
    """The class names of ``raise X(...)`` / ``raise X`` in one file (``raise`` alone re-raises)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id[:1].isupper():
                names.add(target.id)
            elif isinstance(target, ast.Attribute):
                names.add(target.attr)
    return names


def _defined_classes(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_raised_class_is_built_in_or_in_the_hierarchy(path: Path) -> None:
    strangers = _raised(path) - DEFINED_HERE - BUILTIN
    assert not strangers, f"{path.name} raises {sorted(strangers)}: define them in higgs_worker/errors.py"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_exception_class_is_defined_outside_the_hierarchy(path: Path) -> None:
    if path.name == "errors.py" and path.parent.name == "higgs_worker":
        return
    classes = _defined_classes(path)
    module_errors = {name for name in classes if name.endswith(("Error", "Exception"))}
    assert not module_errors, f"{path.name} defines {sorted(module_errors)}: move them to errors.py"


def test_each_client_error_has_a_status_and_an_openai_type() -> None:
    for name in DEFINED_HERE:
        cls = getattr(errors, name)
        if issubclass(cls, errors.WorkerError):
            assert 400 <= cls.status < 600, name
            kind = "invalid_request_error" if cls.status < 500 else "server_error"
            assert cls.kind == kind, name


def test_the_readme_statuses_are_the_classes_statuses() -> None:
    """The README's promise: 400 a bad field, 404 an unknown voice, 409 a taken name, 422 unusable audio."""
    assert errors.RequestError.status == errors.InvalidVoiceValue.status == errors.InvalidVoice.status == 400
    assert errors.RequestPlanError.status == 400
    assert errors.UnknownVoiceError.status == errors.VoiceNotFound.status == 404
    assert errors.VoiceExists.status == 409
    assert errors.ReferenceAudioError.status == errors.InvalidVoiceAudio.status == 422
    assert errors.ModelStoreError.status == errors.RuntimeConfigError.status == 503


def test_the_engine_refusal_is_translated_at_the_pipeline(tmp_path: Path) -> None:
    """boson_multimodal knows nothing of doors: its SpeechRequestError reaches them as a BadRequest."""
    from boson_multimodal.errors import SequenceTooLong
    from higgs_worker.pipeline import _engine_refusals

    with pytest.raises(errors.SpeechNotPossible, match="too long") as raised, _engine_refusals():
        raise SequenceTooLong("too long for one sequence")
    assert raised.value.status == 400
