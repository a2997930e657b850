#!/usr/bin/env bash
# Install captum-mambalrp into the current Python (see scripts/python_env.sh: a virtualenv,
# conda, pyenv; a system-managed Python gets a .venv). A torch >= 2.13 (setup.cfg's bound) already there is kept;
# otherwise a CPU build of torch is installed first.
# Usage: bash scripts/setup.sh [EXTRAS]    (e.g. "test" or "test,viz")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/python_env.sh)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
extras=${1:-}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() {  # the end of the failing command's output, then one line saying what failed
  tail -n 15 "$log" >&2
  echo "setup.sh: error: $*" >&2
  exit 1
}
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m ensurepip -q >"$log" 2>&1 || fail "$PY has no pip and ensurepip failed (on Debian/Ubuntu: apt-get install python3-pip)"
fi
# torch first: `pip install -e .` alone would resolve `torch` to a multi-GB CUDA build, as PyPI's
# Linux torch is; PyTorch's CPU index beside the configured ones offers 2.13.0+cpu, which pip prefers
# (an unreachable index is skipped after pip's retries, under your pip configuration's timeout;
# a machine whose own index has the CPU wheel gets it from there)
cpu_index=${MAMBALRP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if ! "$PY" -c "import sys, torch; sys.exit(tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) < (2, 13))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" --extra-index-url "$cpu_index" >"$log" 2>&1 ||
    fail "pip install torch==2.13.0 failed (output above)"
fi
if [ -n "$extras" ]; then spec=".[$extras]"; else spec="."; fi
"$PY" -m pip install -q -e "$spec" >"$log" 2>&1 || fail "pip install -e '$spec' failed (output above)"
if [[ ",$extras," == *",test,"* ]]; then
  # LXT (AttnLRP's reference, tests/test_lxt_reference.py) without its dependencies: they pull
  # torchvision (open_clip_torch), which would replace torch; the tests use only its efficient rules.
  "$PY" -m pip install -q --no-deps "lxt==2.1" >"$log" 2>&1 || fail "pip install --no-deps lxt==2.1 failed (output above)"
fi
"$PY" -c "import torch, captum, transformers, captum_mambalrp
print('torch', torch.__version__, '| captum', captum.__version__, '| transformers', transformers.__version__, '| captum-mambalrp', captum_mambalrp.__version__, '|', __import__('sys').executable)" 2>"$log" ||
  fail "the installed packages do not import with $PY"
