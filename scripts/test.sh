#!/usr/bin/env bash
# Install what the tests need, then run the whole suite. Used by CI (.ci/run) and by people.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt
python3 -m pytest -q "$@"
