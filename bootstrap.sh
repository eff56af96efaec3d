#!/usr/bin/env bash
# Start-up of the Higgs Audio worker: check the machine, make sure the heavy runtime (torch, transformers…) is
# installed on the volume, then exec into Python. The image stays thin because the runtime lives on the network
# volume, installed from the hashed lock (requirements/runtime.lock) once per lock, under a file lock, in a
# temporary directory renamed into place, so concurrent or killed boots never leave an environment that a later
# boot trusts. The same lock never reinstalls; a changed lock (bash scripts/lock.sh) always does.
#
#   bootstrap.sh [--local [--port N]] [--demo] [--] [handler args, e.g. --test_input '{...}']
#
# Overrides: RUNPOD_VOLUME_PATH, RUNTIME_LOCK, IMAGE_LOCK (local mode), RUNTIME_REQUIREMENTS, RUNTIME_IMPORTS,
# HANDLER, BOOTSTRAP_PYTHON, BOOTSTRAP_LOCK_STALE_S, RUNTIME_SIZE_GB, PORT; the installer (uv) reads its own UV_* variables
# (UV_FIND_LINKS, UV_NO_INDEX, UV_OFFLINE, UV_INDEX_URL…). Never `set -x` here: the environment holds secrets.
set -euo pipefail

log() { printf '[bootstrap %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() {
  log "ERROR: $*"
  exit 1
}

APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$APP_DIR" # the code's directory, never the volume: the handler and demo_model.py are found here

LOCAL=false
DEMO=false
HTTP=false # --local --http: the OpenAI-compatible HTTP server (ENDPOINT_TYPE=LOAD_BALANCER) on 127.0.0.1
PORT="${PORT:-8000}"
HANDLER_ARGS=()
while (($#)); do
  case "$1" in
    --local) LOCAL=true ;;
    --demo) DEMO=true ;;
    --http) HTTP=true ;;
    --port)
      (($# >= 2)) || die "--port needs a value (a TCP port, 1-65535)"
      PORT="$2"
      shift
      ;;
    --port=*) PORT="${1#--port=}" ;;
    --)
      shift
      HANDLER_ARGS+=("$@")
      break
      ;;
    *) HANDLER_ARGS+=("$1") ;;
  esac
  shift
done
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die "--port/PORT must be a TCP port number 1-65535, got '$PORT'"
fi

HANDLER="${HANDLER:-$APP_DIR/serverless_handler.py}"
RUNTIME_LOCK="${RUNTIME_LOCK:-$APP_DIR/requirements/runtime.lock}"                 # what is installed
IMAGE_LOCK="${IMAGE_LOCK:-$APP_DIR/requirements/image.lock}"                       # local mode: what the image holds
RUNTIME_REQUIREMENTS="${RUNTIME_REQUIREMENTS:-$APP_DIR/requirements/runtime.txt}" # its top-level names: import-checked
BOOTSTRAP_PYTHON="${BOOTSTRAP_PYTHON:-python3}"
LOCK_STALE_S="${BOOTSTRAP_LOCK_STALE_S:-1800}"
[[ "$LOCK_STALE_S" =~ ^[0-9]+$ ]] || die "BOOTSTRAP_LOCK_STALE_S must be a whole number of seconds, got '$LOCK_STALE_S'"
MIN_FREE_GB=20 # models (~12 GB) + runtime (~7 GB)
RUNTIME_GB="${RUNTIME_SIZE_GB:-7}" # what the runtime set takes on disk: checked before installing
[[ "$RUNTIME_GB" =~ ^[0-9]+$ ]] || die "RUNTIME_SIZE_GB must be a whole number of GB, got '$RUNTIME_GB'"
export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE="${UV_LINK_MODE:-copy}"

# --- checks -------------------------------------------------------------------------------------------------
# The runpod SDK prints every job's input and output at DEBUG and TRACE: base64 audio and reference audio, user
# data that must never reach a log. Default to INFO (as the image does; the SDK's own default is DEBUG) and
# never go below it.
RUNPOD_LOG_LEVEL="${RUNPOD_LOG_LEVEL:-INFO}"
case "${RUNPOD_LOG_LEVEL^^}" in
  DEBUG | TRACE)
    warn "RUNPOD_LOG_LEVEL=$RUNPOD_LOG_LEVEL would log every job's audio: using INFO"
    RUNPOD_LOG_LEVEL=INFO
    ;;
esac
export RUNPOD_LOG_LEVEL
for ((i = 0; i < ${#HANDLER_ARGS[@]}; i++)); do
  arg="${HANDLER_ARGS[i]}"
  level=""
  if [[ "$arg" == --rp_log_level=* ]]; then level="${arg#*=}"; elif [[ "$arg" == --rp_log_level ]]; then level="${HANDLER_ARGS[i + 1]:-}"; fi
  if [[ "${level^^}" == DEBUG || "${level^^}" == TRACE ]]; then
    die "--rp_log_level $level would log every job's audio (inputs and outputs); use INFO, WARN or ERROR"
  fi
done
if ! $LOCAL; then
  log "mode: container"
elif $HTTP; then
  log "mode: local (the OpenAI-compatible HTTP server on 127.0.0.1:$PORT)"
else
  log "mode: local (the runpod SDK's local API on 127.0.0.1:$PORT)"
fi
command -v "$BOOTSTRAP_PYTHON" >/dev/null || die "python not found ('$BOOTSTRAP_PYTHON'); set BOOTSTRAP_PYTHON"
log "python: $("$BOOTSTRAP_PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"

if command -v nvidia-smi >/dev/null && gpus="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1)"; then
  log "GPU: ${gpus//$'\n'/; }"
elif $LOCAL; then
  log "no GPU found: the model will run on the CPU"
else
  warn "no GPU found: the worker will run on the CPU, far slower than real time"
fi

if [[ -n "${RUNPOD_VOLUME_PATH:-}" ]]; then
  VOLUME="$RUNPOD_VOLUME_PATH"
elif [[ -d /runpod-volume ]]; then
  VOLUME=/runpod-volume
else
  VOLUME="$APP_DIR/.volume"
  if $LOCAL; then
    log "no network volume: using $VOLUME"
  else
    warn "no network volume mounted at /runpod-volume: using $VOLUME on the container disk;" \
      "EVERY cold start will reinstall the runtime and download the models. Attach a network volume."
  fi
fi
if ! mkdir -p "$VOLUME/runtime" 2>/dev/null || ! probe="$(mktemp "$VOLUME/runtime/.probe-XXXXXX" 2>/dev/null)"; then
  die "the volume $VOLUME is not writable by $(id -un); run as root or fix its ownership"
fi
rm -f "$probe"
VOLUME="$(cd "$VOLUME" && pwd)"
export RUNPOD_VOLUME_PATH="$VOLUME" # the handler's settings then agree with what was checked here
free_gb="$(df -Pk "$VOLUME" | awk 'NR==2 {printf "%d", $4 / 1048576}')"
log "volume: $VOLUME ($free_gb GB free)"
((free_gb >= MIN_FREE_GB)) || warn "only $free_gb GB free on $VOLUME: models and runtime need ~$MIN_FREE_GB GB"

# The installer: the image ships uv; a local run without it gets the image's pinned uv onto the volume once.
if ! command -v uv >/dev/null; then
  $LOCAL || die "the installer 'uv' is not on PATH (it ships in the image: requirements/image.lock)"
  uv_pin="$(sed -nE 's/^(uv==[^ ]+).*/\1/p' "$IMAGE_LOCK" 2>/dev/null || true)"
  [[ -n "$uv_pin" ]] || die "no 'uv==' pin in IMAGE_LOCK=$IMAGE_LOCK"
  uv_dir="$VOLUME/tools/${uv_pin/==/-}"
  if [[ ! -x "$uv_dir/bin/uv" ]]; then
    log "installing $uv_pin into $uv_dir (the image would bring it)"
    "$BOOTSTRAP_PYTHON" -m pip install --quiet --disable-pip-version-check --target "$uv_dir" "$uv_pin" ||
      die "could not install $uv_pin with pip; install uv (https://docs.astral.sh/uv/) and run again"
  fi
  export PATH="$uv_dir/bin:$PATH"
fi
log "installer: $(command -v uv)"

# --- the runtime environment on the volume ------------------------------------------------------------------
[[ -r "$RUNTIME_LOCK" ]] || die "RUNTIME_LOCK=$RUNTIME_LOCK is not a readable file"
[[ -r "$RUNTIME_REQUIREMENTS" ]] || die "RUNTIME_REQUIREMENTS=$RUNTIME_REQUIREMENTS is not a readable file"
LOCK_FILES=("$RUNTIME_LOCK")
if $LOCAL; then # no image around us: the runtime environment also carries what the image would
  [[ -r "$IMAGE_LOCK" ]] || die "IMAGE_LOCK=$IMAGE_LOCK is not a readable file"
  LOCK_FILES+=("$IMAGE_LOCK")
fi
# Same locks on the same interpreter and platform → same environment; anything else gets a new one.
KEY="$(
  {
    cat "${LOCK_FILES[@]}"
    "$BOOTSTRAP_PYTHON" -c 'import sys; print(sys.version, sys.base_prefix)'
    uname -m
    getconf GNU_LIBC_VERSION 2>/dev/null || echo unknown-libc
  } | sha256sum | cut -c1-16
)"
RUNTIME_ROOT="$VOLUME/runtime"
ENV_DIR="$RUNTIME_ROOT/$KEY"
MARKER="$ENV_DIR/.bootstrap-complete"
LOCK="$RUNTIME_ROOT/.lock-$KEY"

# The modules to import-check: RUNTIME_IMPORTS, or the runtime requirement names (`foo-bar>=1` → foo_bar).
read -ra IMPORTS <<<"${RUNTIME_IMPORTS:-$(sed -E 's/#.*//; /^[[:space:]]*(-|$)/d; s/^[[:space:]]*([A-Za-z0-9._-]+).*/\1/' \
  "$RUNTIME_REQUIREMENTS" | tr 'A-Z.-' 'a-z__' | tr '\n' ' ')}"

# usable ENV_PY MODE: MODE=import imports every module (after an install); MODE=find only locates them (each
# boot), because importing torch twice per cold start costs seconds and the handler imports it right after.
usable() {
  "$1" - "$2" "${IMPORTS[@]}" <<'EOF'
import importlib, importlib.util, sys
mode, modules = sys.argv[1], sys.argv[2:]
for module in modules:
    if mode == "import":
        importlib.import_module(module)
    elif importlib.util.find_spec(module) is None:
        sys.exit(f"module {module} not found")
EOF
}

HOLDING_LOCK=false
TMP_ENV=""
cleanup() {
  [[ -n "$TMP_ENV" ]] && rm -rf "$TMP_ENV"
  if $HOLDING_LOCK; then rm -rf "$LOCK"; fi
}
trap cleanup EXIT

acquire_lock() {
  local owner pid host since age waited=0
  until mkdir "$LOCK" 2>/dev/null; do
    owner="$(cat "$LOCK/owner" 2>/dev/null || true)"
    read -r pid host since <<<"${owner:-? ? ?}"
    [[ "$since" =~ ^[0-9]+$ ]] || since="$(stat -c %Y "$LOCK" 2>/dev/null || date +%s)"
    age=$(($(date +%s) - since))
    if { [[ "$host" == "$(hostname)" ]] && ! kill -0 "$pid" 2>/dev/null; } || ((age > LOCK_STALE_S)); then
      warn "removing a stale runtime lock (owner: ${owner:-unknown}, ${age}s old)"
      # Rename first: of several boots that judged it stale, exactly one wins the rename.
      mv "$LOCK" "$LOCK.stale.$$" 2>/dev/null && rm -rf "$LOCK.stale.$$"
      continue
    fi
    ((waited % 15 == 0)) && log "waiting for the runtime install by pid $pid on $host (${age}s so far)"
    sleep 1
    waited=$((waited + 1))
  done
  HOLDING_LOCK=true
  echo "$$ $(hostname) $(date +%s)" >"$LOCK/owner"
}

install_runtime() {
  local free_kb installer_log
  free_kb="$(df -Pk "$RUNTIME_ROOT" | awk 'NR==2 {print $4}')"
  ((free_kb >= RUNTIME_GB * 1048576)) ||
    die "the volume is full: $((free_kb / 1048576)) GB free, the runtime needs ~$RUNTIME_GB GB; free space or grow the volume"
  rm -rf "$RUNTIME_ROOT/.tmp-$KEY-"* "$ENV_DIR" # leftovers of a killed or broken install (we hold the lock)
  TMP_ENV="$(mktemp -d "$RUNTIME_ROOT/.tmp-$KEY-XXXXXX")"
  log "installing the runtime into $ENV_DIR from ${LOCK_FILES[*]} (first boot on this volume: minutes)"
  # No pip inside (uv installs from outside) and the image's packages visible: RunPod's own recipe for venvs
  # on network volumes. Relocatable, because it is built in a temporary directory and renamed into place.
  uv venv --quiet --relocatable --system-site-packages --python "$BOOTSTRAP_PYTHON" "$TMP_ENV" ||
    die "could not create a virtual environment with $BOOTSTRAP_PYTHON"
  installer_log="$TMP_ENV/.install.log"
  local requirement_args=()
  for file in "${LOCK_FILES[@]}"; do requirement_args+=(-r "$file"); done
  if ! uv pip install --require-hashes --compile-bytecode --python "$TMP_ENV/bin/python" "${requirement_args[@]}" \
    >"$installer_log" 2>&1; then
    tail -n 25 "$installer_log" >&2
    if grep -qi 'no space left on device' "$installer_log"; then
      die "the volume is full: $(df -Pk "$RUNTIME_ROOT" | awk 'NR==2 {printf "%d", $4 / 1048576}') GB free, the runtime needs ~$RUNTIME_GB GB"
    elif grep -qiE 'failed to fetch|error sending request|dns error|connection refused|timed out|tcp connect' "$installer_log"; then
      die "could not reach the package index: check network / UV_INDEX_URL"
    fi
    die "the installer rejected the lock (output above); check RUNTIME_LOCK=$RUNTIME_LOCK (bash scripts/lock.sh)"
  fi
  log "import check: ${IMPORTS[*]}"
  usable "$TMP_ENV/bin/python" import || die "the runtime installed but does not import (above); check RUNTIME_LOCK"
  printf 'key=%s\ncompleted=%s\nlocks=%s\n' "$KEY" "$(date -u +%FT%TZ)" "${LOCK_FILES[*]}" \
    >"$TMP_ENV/.bootstrap-complete"
  mv "$TMP_ENV" "$ENV_DIR"
  TMP_ENV=""
  log "runtime ready: $ENV_DIR"
}

if [[ -f "$MARKER" ]] && usable "$ENV_DIR/bin/python" find 2>/dev/null; then
  log "reusing runtime $ENV_DIR"
else
  acquire_lock
  if [[ -f "$MARKER" ]] && usable "$ENV_DIR/bin/python" find 2>/dev/null; then
    log "reusing runtime $ENV_DIR (installed by another boot while this one waited)"
  else
    [[ -e "$ENV_DIR" ]] && warn "runtime $ENV_DIR is incomplete or broken: rebuilding it"
    install_runtime
  fi
  rm -rf "$LOCK"
  HOLDING_LOCK=false
fi

# --- hand over to Python --------------------------------------------------------------------------------------
PYTHON="$ENV_DIR/bin/python"
export VIRTUAL_ENV="$ENV_DIR" PATH="$ENV_DIR/bin:$PATH"
# COMPILE_STEP's kernels, compiled once per runtime and kept beside it on the volume (they depend on its torch)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ENV_DIR/compile-cache/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ENV_DIR/compile-cache/triton}"
if $DEMO; then
  export DEMO_MODEL=true # the worker serves the local demo build; without it the hub's model replaces it
  log "publishing the demo model (python demo_model.py)"
  "$PYTHON" demo_model.py || die "the demo model could not be published (above)"
fi
trap - EXIT
if $LOCAL && $HTTP; then
  log "starting $HANDLER (HTTP mode) on http://127.0.0.1:$PORT"
  ENDPOINT_TYPE=LOAD_BALANCER HTTP_HOST=127.0.0.1 PORT="$PORT" exec "$PYTHON" -u "$HANDLER" "${HANDLER_ARGS[@]}"
fi
if $LOCAL; then
  log "starting $HANDLER on http://127.0.0.1:$PORT"
  exec "$PYTHON" -u "$HANDLER" --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port "$PORT" "${HANDLER_ARGS[@]}"
fi
log "starting $HANDLER"
exec "$PYTHON" -u "$HANDLER" "${HANDLER_ARGS[@]}"
