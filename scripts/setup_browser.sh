#!/usr/bin/env bash
# What the browser tests need, installed only when missing:
#  - Chromium from Debian's packages (chromium, chromium-driver); never a downloaded browser;
#  - Playwright's Python package (it drives that Chromium; no `playwright install`);
#  - .venv-insights: Captum 0.8 (which still has Captum Insights) beside the main Captum 0.9.
# Usage: bash scripts/setup_browser.sh   (after scripts/setup.sh; as root, or with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # run a command; show its output only when it fails
  "$@" >"$log" 2>&1 || { cat "$log"; echo "setup_browser.sh: failed: $*" >&2; exit 1; }
}
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  quiet $SUDO apt-get update -qq
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
if ! $PY -c "import playwright.sync_api" 2>/dev/null; then
  quiet $PY -m pip install -q playwright
fi
if [ ! -x .venv-insights/bin/python ]; then
  quiet $PY -m captum_mambalrp.insights --make-venv .venv-insights
fi
echo "browser tests: $(/usr/bin/chromium --version 2>/dev/null);" \
  "$(.venv-insights/bin/python -c 'import captum, captum.insights; print("Insights venv: captum", captum.__version__)')"
