#!/usr/bin/env bash
# The main job: set up, then explain a text with the embedded default model.
# Usage: bash scripts/explain.sh "i feel so happy and loved today" [more captum-mambalrp explain options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh viz >/dev/null
if [ $# -eq 0 ]; then set -- "i feel so happy and loved today"; fi
exec "${PYTHON:-python3}" -m captum_mambalrp explain --color "$@"
