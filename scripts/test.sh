#!/usr/bin/env bash
# Install what the tests need (system packages included) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k snapshot -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
