#!/usr/bin/env bash
# The test suite: set up everything the tests need, then run pytest.
# Usage: bash scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
