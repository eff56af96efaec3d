"""What the code needs is declared, locked and installed by the test command, read from the files themselves.

- Every third-party module any Python file here imports belongs to a distribution that a requirement set
  names directly (not one that only arrives through another package's requirements), and the shipped code's
  belong to the image or runtime set, the ones a worker has.
- Each lock pins every top-level requirement of its sets at the same version, with hashes, and the locks agree
  with each other (no network: `bash scripts/lock.sh` is what refreshes them).
- Every program a test runs is installed by the test command: from the lock (the venv's own tools) or from the
  one list of system packages, which the README's prerequisites repeat.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"
SETS = ("image", "runtime", "test")
SHIPPED = (
    "serverless_handler.py",
    "demo_model.py",
    "higgs_worker",
    "http_api",
    "queue_api",
    "boson_multimodal",
)
SYSTEM_PACKAGES = REPO / "scripts" / "system-packages.txt"
# Programs of Debian's essential set, on every Debian machine, so no list needs to name them.
ESSENTIAL = {"bash", "mount", "umount"}
RUNNERS = {"run", "Popen", "check_call", "check_output", "call"}  # subprocess's
LOOKUPS = {"which", "with_name", "tool"}  # shutil.which, Path.with_name beside the interpreter, tests' tool()


def canonical(name: str) -> str:
    """A distribution name as the packaging standards compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_files() -> Iterator[Path]:
    for path in sorted(REPO.rglob("*.py")):
        if not any(part.startswith(".") for part in path.relative_to(REPO).parts):
            yield path


def requirement_pins(name: str) -> dict[str, str]:
    """`requirements/<name>.txt` as {canonical name: version}; every line an exact `==` pin."""
    pins = {}
    for line in (REQUIREMENTS / f"{name}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
            assert match, f"requirements/{name}.txt: {line!r} is not an exact pin (name==version)"
            pins[canonical(match[1])] = match[2]
    return pins


@dataclass(frozen=True)
class Locked:
    version: str
    hashes: tuple[str, ...]


def lock(name: str) -> dict[str, Locked]:
    """`requirements/<name>.lock` as uv writes it: `name==version \\` then `--hash=sha256:…` lines."""
    text = (REQUIREMENTS / f"{name}.lock").read_text()
    entries = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if match:
            entries[canonical(match[1])] = Locked(match[2], tuple(re.findall(r"--hash=sha256:(\w+)", block)))
    return entries


def declared() -> dict[str, str]:
    """Every distribution a requirement set names: {canonical name: the set}."""
    return {name: kind for kind in SETS for name in requirement_pins(kind)}


def imported_modules() -> dict[str, set[str]]:
    """Third-party top-level modules: {module: the files importing it}. Local modules (any .py file or
    folder of this repository, tests' helpers included) and the standard library are left out."""
    local = {path.stem for path in python_files()} | {path.name for path in REPO.iterdir() if path.is_dir()}
    found: dict[str, set[str]] = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_module_belongs_to_a_directly_declared_distribution() -> None:
    sets = declared()
    owners = importlib.metadata.packages_distributions()
    modules = imported_modules()
    assert {"torch", "fastapi", "yaml", "botocore", "pytest"} <= set(modules), "the walk finds imports"
    undeclared = []
    for module, files in sorted(modules.items()):
        distributions = {canonical(d) for d in owners.get(module, [])}
        kinds = {sets[d] for d in distributions if d in sets}
        if not kinds:
            owner = sorted(distributions) or "unknown"
            undeclared.append(f"{module} (distribution {owner}; imported by {sorted(files)[0]})")
        elif any(file.startswith(SHIPPED) for file in files) and not kinds & {"image", "runtime"}:
            undeclared.append(f"{module}: shipped code imports it, yet only the test set declares it")
    assert not undeclared, "declare these in requirements/{image,runtime,test}.txt:\n" + "\n".join(undeclared)


def test_a_package_is_declared_in_one_set_only() -> None:
    seen: dict[str, str] = {}
    for kind in SETS:
        for name in requirement_pins(kind):
            assert name not in seen, f"{name} is declared in both {seen[name]}.txt and {kind}.txt"
            seen[name] = kind


def test_each_lock_pins_its_sets_top_level_requirements_at_the_same_versions_with_hashes() -> None:
    for lock_name, sets in {"image": ["image"], "runtime": ["runtime"], "test": list(SETS)}.items():
        locked = lock(lock_name)
        for kind in sets:
            for name, version in requirement_pins(kind).items():
                assert name in locked, f"{name} is in {kind}.txt, not {lock_name}.lock: bash scripts/lock.sh"
                assert locked[name].version == version, (
                    f"{kind}.txt pins {name}=={version}, {lock_name}.lock has {locked[name].version}: "
                    "bash scripts/lock.sh"
                )
        for name, entry in locked.items():
            assert entry.hashes, f"{lock_name}.lock: {name} has no hash"


def test_the_locks_agree_so_the_test_venv_is_what_a_worker_runs() -> None:
    image, runtime, test = lock("image"), lock("runtime"), lock("test")
    assert {"torch", "nvidia-cublas-cu12", "runpod", "httpx2"} <= set(test), "the Linux x86_64 resolution"
    for name, entry in runtime.items():
        if name in image:
            assert entry == image[name], f"runtime.lock and image.lock differ on {name}"
    for name, entry in {**image, **runtime}.items():
        assert test.get(name) == entry, f"test.lock differs from the image/runtime locks on {name}"
    assert not set(image) & {"torch", "transformers", "numpy"}, "the image stays thin"


def test_each_lock_says_what_made_it_and_for_which_platform() -> None:
    script = (REPO / "scripts" / "lock.sh").read_text()
    assert "--python-version 3.11" in script and "--python-platform x86_64-manylinux_2_28" in script
    assert "--generate-hashes" in script
    for name in SETS:
        first = (REQUIREMENTS / f"{name}.lock").read_text().splitlines()[0]
        assert "bash scripts/lock.sh" in first and "Linux x86_64, Python 3.11" in first, first


def programs_the_tests_run() -> dict[str, str]:
    """{program: a file running it}: the first string of every command list handed to subprocess, and the
    names looked up with shutil.which, Path.with_name or the tests' tool(); the repository's own scripts
    (`*.py`, `*.sh`) are not programs to install."""
    found: dict[str, str] = {}
    for path in python_files():
        top = path.relative_to(REPO).parts[0]
        if top not in {"tests", "benchmarks"} or path == Path(__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0]
            if called in RUNNERS and isinstance(first, ast.List):
                literals = [e.value for e in first.elts if isinstance(e, ast.Constant)]
                if literals and isinstance(literals[0], str) and not literals[0].startswith("-"):
                    found.setdefault(literals[0], str(path.relative_to(REPO)))
            elif called in LOOKUPS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.setdefault(first.value, str(path.relative_to(REPO)))
    return {program: where for program, where in found.items() if not program.endswith((".py", ".sh"))}


def system_packages() -> dict[str, list[str]]:
    """scripts/system-packages.txt as {Debian package: the programs the tests run from it}."""
    packages = {}
    for line in SYSTEM_PACKAGES.read_text().splitlines():
        words = line.split("#")[0].split()
        if words:
            assert len(words) >= 2, f"system-packages.txt: {line!r} names no program"
            packages[words[0]] = words[1:]
    return packages


def venv_programs() -> dict[str, str]:
    """{program: its distribution} for the executables that installed distributions put in the venv's bin."""
    programs = {}
    for distribution in importlib.metadata.distributions():
        for file in distribution.files or []:
            if file.parent.name == "bin":
                programs[file.name] = canonical(distribution.metadata["Name"])
    return programs


def test_every_program_a_test_runs_is_installed_by_the_test_command() -> None:
    programs = programs_the_tests_run()
    assert {"espeak-ng", "curl", "weed", "shellcheck", "hadolint", "uv", "bash"} <= set(programs), programs
    from_list = {program for names in system_packages().values() for program in names}
    from_venv = venv_programs()
    locked = lock("test")
    for program, where in sorted(programs.items()):
        if program in from_list or program in ESSENTIAL:
            continue
        assert program in from_venv, (
            f"{where} runs {program!r}, which neither the lock's packages nor scripts/system-packages.txt "
            "install"
        )
        assert from_venv[program] in locked, f"{program} comes from {from_venv[program]}, not in test.lock"


def test_the_system_package_list_names_only_programs_the_tests_run() -> None:
    programs = programs_the_tests_run()
    for package, names in system_packages().items():
        for program in names:
            assert program in programs, f"system-packages.txt: no test runs {program} ({package}); drop it"


def test_the_readme_prerequisites_name_the_same_system_packages_and_the_test_command_reads_the_list() -> None:
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("```bash")]
    for package in system_packages():
        assert f"`{package}`" in quick_start, f"the README's prerequisites do not name {package}"
    assert "scripts/system-packages.txt" in quick_start
    test_command = (REPO / "scripts" / "test.sh").read_text()
    assert "scripts/system-packages.txt" in test_command
    assert "--require-hashes -r requirements/test.lock" in test_command


def test_the_test_command_runs_the_type_checker_it_installs() -> None:
    test_command = (REPO / "scripts" / "test.sh").read_text()
    assert re.search(r"^mypy \|\| typed=", test_command, re.M), "scripts/test.sh runs mypy"
    assert "mypy" in requirement_pins("test") and "mypy" in lock("test")
    assert "[tool.mypy]" in (REPO / "pyproject.toml").read_text()


def test_the_test_command_installs_the_listed_package_whose_program_is_missing(tmp_path: Path) -> None:
    """scripts/test.sh on a machine with curl and g++ but no espeak-ng: apt-get is asked for espeak-ng."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("test.sh", "system-packages.txt"):
        (checkout / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("bash", "sed", "awk", "date", "id", "dirname", "env", "curl", "g++", "cat"):
        found = shutil.which(program)
        assert found, f"{program} is part of the base system or installed by scripts/test.sh"
        (bin_dir / program).symlink_to(found)
    calls = tmp_path / "apt-calls"
    shims = {
        "df": "echo 'Filesystem 1024-blocks Used Available'; echo '/dev/x 1 0 99999999 0% /'",
        "apt-get": f'echo "$*" >>{calls}',
        "python3": "exit 7",  # where the venv would be created: the part under test is over
    }
    for name, body in shims.items():
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    as_root = os.geteuid() == 0
    result = subprocess.run(
        [str(bin_dir / "bash"), "scripts/test.sh"],
        cwd=checkout,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if not as_root:  # no sudo on this PATH: the command says what to install and stops
        assert result.returncode == 1 and "missing system packages: espeak-ng (" in result.stderr
        return
    assert result.returncode == 7, result.stderr
    assert "installing system packages: espeak-ng" in result.stdout
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq espeak-ng"]
