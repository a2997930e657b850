#!/usr/bin/env bash
# The test suite: set up everything the tests need, then run pytest.
# Usage: bash scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_browser.sh   # Chromium (Debian), Playwright, the Captum-0.8 Insights venv
exec "${PYTHON:-python3}" -m pytest -q "$@"
