#!/usr/bin/env bash
# Refresh the hashed locks from the requirement sets: `bash scripts/lock.sh`. Run it after editing any
# requirements/*.txt and commit the .lock files with it (tests/test_dependencies.py fails until they agree).
#
# The locks are for the image's platform, Linux x86_64 (manylinux 2.28) with Python 3.11, resolved by uv from
# PyPI with every file's sha256:
#   image.lock    the image set (Dockerfile.runpod.ultra installs it)
#   runtime.lock  the runtime set, constrained to image.lock's versions, because the runtime environment sees
#                 the image's packages (bootstrap.sh installs it, and keys the volume's runtime on it)
#   test.lock     all three sets together, constrained to both locks, so the test venv runs what a worker runs
#                 (scripts/test.sh installs it)
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-uv}"
command -v "$UV" >/dev/null || UV=.venv/bin/uv
compile() {
  local output="$1"
  shift
  "$UV" pip compile --quiet --generate-hashes --no-header --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple --no-config \
    --output-file "$output" "$@"
  { echo "# $output, by \`bash scripts/lock.sh\` (Linux x86_64, Python 3.11). Do not edit." &&
    cat "$output"; } >"$output.new"
  mv "$output.new" "$output"
}
compile requirements/image.lock requirements/image.txt
compile requirements/runtime.lock requirements/runtime.txt --constraint requirements/image.lock
compile requirements/test.lock requirements/image.txt requirements/runtime.txt requirements/test.txt \
  --constraint requirements/image.lock --constraint requirements/runtime.lock
