#!/usr/bin/env bash
# What the browser tests need, installed only when missing:
#  - Chromium from Debian's packages (chromium, chromium-driver); never a downloaded browser;
#  - Playwright's Python package (it drives that Chromium; no `playwright install`);
#  - the Insights virtualenv ($MAMBALRP_INSIGHTS_VENV, default .venv-insights): Captum 0.8 (which
#    still has Captum Insights) beside the main Captum 0.9, seeing this environment's torch.
#    A broken one (e.g. linked to an environment that is gone) is made again.
# Usage: bash scripts/setup_browser.sh   (after scripts/setup.sh; as root, or with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/python_env.sh)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
venv=${MAMBALRP_INSIGHTS_VENV:-.venv-insights}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # run a command; show the end of its output and one line only when it fails
  "$@" >"$log" 2>&1 || { tail -n 15 "$log" >&2; echo "setup_browser.sh: error: failed: $*" >&2; exit 1; }
}
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  quiet $SUDO apt-get update -qq
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  quiet "$PY" -m pip install -q playwright
fi
# checks the virtualenv (imports torch, Captum Insights, captum_mambalrp) and makes it again when broken
"$PY" -m captum_mambalrp.insights --make-venv "$venv" >"$log" 2>&1 || {
  grep -m1 "error:" "$log" >&2 || tail -n 1 "$log" >&2
  echo "setup_browser.sh: error: the Insights virtualenv $venv is not usable (see the line above); remove it and re-run" >&2
  exit 1
}
echo "browser tests: $(/usr/bin/chromium --version 2>/dev/null);" \
  "Insights venv $venv: $("$venv/bin/python" -c 'import captum; print("captum", captum.__version__)' 2>&1 | tail -n 1)"
