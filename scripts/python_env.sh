#!/usr/bin/env bash
# Prints the Python interpreter that the scripts install into and run with:
#   $PYTHON if set, else python3 (a virtualenv's, conda's, pyenv's, the system's);
#   when that interpreter is the system's and the system manages its packages (PEP 668,
#   e.g. Debian's /usr/bin/python3, where `pip install` is refused), a virtualenv made from
#   it ($MAMBALRP_VENV, default .venv; created on first use; messages go to stderr).
# Usage: PY=$(bash scripts/python_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup: error: no Python interpreter '$PY' on PATH; install Python 3.11+ or set PYTHON=/path/to/python3" >&2
  exit 1
fi
# transformers >= 5.23 (setup.cfg) needs Python 3.11: say so here, not in pip's resolver output
version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
  echo "setup: error: '$PY' does not run as a Python interpreter; set PYTHON=/path/to/python3" >&2
  exit 1
}
case "$version" in
  3.1[1-9] | 3.[2-9][0-9] | [4-9].*) ;;
  *)
    echo "setup: error: '$PY' is Python $version; captum-mambalrp needs Python 3.11+ (transformers 5.23+ does); set PYTHON=/path/to/python3.11" >&2
    exit 1
    ;;
esac
managed=$("$PY" -c 'import os, sys, sysconfig
venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
print(int(not venv and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))') || {
  echo "setup: error: '$PY' does not run as a Python interpreter; set PYTHON=/path/to/python3" >&2
  exit 1
}
venv=${MAMBALRP_VENV:-.venv}
if [ "$managed" = 1 ]; then
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "" 2>/dev/null; then
    echo "setup: $(command -v "$PY") is managed by the system (PEP 668): installing into the virtualenv $venv instead" >&2
    rm -rf "$venv"
    "$PY" -m venv "$venv" >&2 || {
      echo "setup: error: cannot create $venv with '$PY -m venv' (on Debian/Ubuntu: apt-get install python3-venv)" >&2
      exit 1
    }
  fi
  (cd "$venv" && echo "$PWD/bin/python")
else
  "$PY" -c 'import sys; print(sys.executable)'
fi
