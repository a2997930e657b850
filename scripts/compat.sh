#!/usr/bin/env bash
# The declared version ranges (setup.cfg: torch, captum, transformers) tested at both ends: one
# fresh virtualenv per combination, the package installed from a snapshot of HEAD (git archive),
# a subset of the tests run there, one row per combination in a results table.
#
# Usage: bash scripts/compat.sh [NAME ...]        (default: every combination below)
#   COMPAT_DIR   where the venvs, snapshots and logs go (default: runs/compat; removed per run
#                unless COMPAT_KEEP=1)
#   COMPAT_TESTS the pytest arguments (default: $TESTS below)
#   COMPAT_COMBOS the combinations, one "name|torch|captum|transformers|further pins" a line (default below)
#   COMPAT_FIND_LINKS a folder of wheels pip may use first (e.g. one filled by `pip download torch==2.1.2`)
# Prints the table (markdown) at the end and writes it to $COMPAT_DIR/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/python_env.sh)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
links=()
[ -z "${COMPAT_FIND_LINKS:-}" ] || links=(--find-links "$COMPAT_FIND_LINKS")
dir=${COMPAT_DIR:-runs/compat}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
TESTS=${COMPAT_TESTS:-"tests/test_api.py tests/test_layer.py tests/test_conservation.py tests/test_captum_interop.py tests/test_rules.py tests/test_mamba2.py tests/test_faults.py tests/test_accelerate.py"}

# name | torch | captum | transformers | further pins   (torch 2.13.0 is the local CPU build;
# another torch comes from PyPI: a CUDA build with its nvidia-* packages, several GB). "lowest" is
# setup.cfg's lower ends; the rows after it are older releases, kept to show why the bounds are there.
COMBOS=${COMPAT_COMBOS:-"
newest|2.13.0|0.9.0|5.24.0|
captum-0.8|2.13.0|0.8.0|5.24.0|
captum-low|2.13.0|0.7.0|5.24.0|
lowest|2.13.0|0.7.0|5.23.0|
transformers-4.57|2.13.0|0.7.0|4.57.6|
torch-2.2|2.2.2|0.7.0|4.57.6|numpy<2
transformers-4.46|2.13.0|0.9.0|4.46.3|
torch-2.1|2.1.2|0.7.0|4.46.3|numpy<2
"}
# the test extra without Triton (its releases are tied to torch's; the Triton tests skip without it)
TEST_DEPS="pytest>=7 hypothesis>=6 accelerate>=0.26 einops ipython matplotlib"
wanted=" $* "
commit=$(git rev-parse --short HEAD)
src="$dir/src-$commit"
if [ ! -d "$src" ]; then
  mkdir -p "$src"
  git archive HEAD | tar -x -C "$src"
fi
table="$dir/results.md"
{
  echo "| combination | torch | captum | transformers | python | result | seconds |"
  echo "|---|---|---|---|---|---|---|"
} >"$table"
for row in $COMBOS; do
  IFS='|' read -r name torch captum transformers extra <<<"$row"
  if [ $# -gt 0 ] && [[ "$wanted" != *" $name "* ]]; then continue; fi
  venv="$dir/venv-$name"
  log="$dir/$name.log"
  start=$(date +%s)
  rm -rf "$venv"
  result=""
  {
    "$PY" -m venv "$venv" &&
      printf 'torch==%s\ncaptum==%s\ntransformers==%s\n%s\n' "$torch" "$captum" "$transformers" "$extra" >"$venv/pins.txt" &&
      "$venv/bin/python" -m pip install -q "${links[@]}" -c "$venv/pins.txt" "torch==$torch" &&
      "$venv/bin/python" -m pip install -q "${links[@]}" -c "$venv/pins.txt" "captum==$captum" "transformers==$transformers" "$src" $TEST_DEPS
  } >"$log" 2>&1 || result="install failed: $(grep -m1 -E 'ERROR|error:' "$log" | cut -c1-120)"
  python_version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")
  if [ -z "$result" ]; then
    versions=$("$venv/bin/python" -c "import torch, captum, transformers; print(torch.__version__, captum.__version__, transformers.__version__)" 2>>"$log") || versions="? ? ?"
    read -r torch captum transformers <<<"$versions"
    # the snapshot's tests (run in the snapshot: its package, installed with the pinned versions)
    (cd "$src" && "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS) >>"$log" 2>&1 || true
    result=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    [ -n "$result" ] || result="pytest gave no summary (see $log)"
  fi
  seconds=$(($(date +%s) - start))
  echo "| $name | $torch | $captum | $transformers | $python_version | $result | $seconds |" | tee -a "$table"
  [ "${COMPAT_KEEP:-0}" = 1 ] || rm -rf "$venv"
done
echo
echo "commit $commit; tests: $TESTS"
cat "$table"
