#!/usr/bin/env bash
# The main job: set up, then explain a text with the embedded default model.
# Usage: bash scripts/explain.sh "i feel so happy and loved today" [more captum-mambalrp explain options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(bash scripts/python_env.sh)  # $PYTHON or python3; a system-managed Python gets a .venv
export PYTHON
bash scripts/setup.sh viz >/dev/null
if [ $# -eq 0 ]; then set -- "i feel so happy and loved today"; fi
exec "$PYTHON" -m captum_mambalrp explain --color "$@"
