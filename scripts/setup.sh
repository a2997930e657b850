#!/usr/bin/env bash
# Install captum-mambalrp with a CPU build of torch into the current Python.
# Usage: bash scripts/setup.sh [EXTRAS]    (e.g. "test" or "test,viz")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
# The CPU build of torch first: otherwise pip resolves `torch` to a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i "running pip as the 'root' user" || true
if [ -n "$extras" ]; then spec=".[$extras]"; else spec="."; fi
$PY -m pip install -q -e "$spec" 2>&1 | grep -v -i "running pip as the 'root' user" || true
$PY -c "import torch, captum, transformers, captum_mambalrp; print('torch', torch.__version__, '| captum', captum.__version__, '| transformers', transformers.__version__, '| captum-mambalrp', captum_mambalrp.__version__)"
