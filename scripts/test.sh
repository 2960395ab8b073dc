#!/usr/bin/env bash
# Install what the tests need (system packages included) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k snapshot -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# A setup the tests cannot do fails them; this also turns any skip into a failure (tests/conftest.py),
# so a green run has run every test.
export VFSNAP_FAIL_ON_SKIP=1
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
