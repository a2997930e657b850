#!/usr/bin/env bash
# The test suite: set up everything the tests need, then run pytest, with the Python that
# scripts/python_env.sh picks ($PYTHON, else python3; a system-managed one gets a .venv).
# Usage: bash scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(bash scripts/python_env.sh)
export PYTHON
echo "test.sh: setting up (the package and its test extras; Chromium, Playwright and the Captum 0.8 Insights venv" \
  "for the browser tests), then pytest; a first run takes about 9 minutes on 2 idle cores" >&2
bash scripts/setup.sh test
bash scripts/setup_browser.sh   # Chromium (Debian), Playwright, the Captum-0.8 Insights venv
exec "$PYTHON" -m pytest -q "$@"
