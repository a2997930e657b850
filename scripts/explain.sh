#!/usr/bin/env bash
# The main job: set up, then explain a text with the embedded default model.
# Usage: bash scripts/explain.sh "i feel so happy and loved today" [more captum-mambalrp explain options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(bash scripts/python_env.sh)  # $PYTHON or python3; a system-managed Python gets a .venv
export PYTHON
# a first run installs (about a minute, its output hidden) and says so; once all is there, later
# runs go straight to the explanation (bash scripts/setup.sh viz updates an installation)
# (-P: not this folder's captum_mambalrp.egg-info; the installed version must be this checkout's and
# every requirement of the package with its viz extra met, as setup.cfg bounds them)
if ! "$PYTHON" -P - 2>/dev/null <<'PY'; then
import configparser
import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
if version("captum-mambalrp") != cfg["metadata"]["version"]:
    sys.exit(1)
for line in requires("captum-mambalrp") or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": "viz"}):
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
sys.exit(tuple(int(x) for x in version("torch").split("+")[0].split(".")[:2]) < (2, 13))
PY
  echo "explain.sh: installing captum-mambalrp and its dependencies (first run: about a minute)..." >&2
  bash scripts/setup.sh viz >/dev/null
fi
if [ $# -eq 0 ]; then set -- "i feel so happy and loved today"; fi
exec "$PYTHON" -m captum_mambalrp explain --color "$@"
