#!/bin/bash
# Runs parts of benchmarks/gpu_scale.py one after the other, each in a fresh process, until
# BUDGET seconds have passed (a part is started only when PART_MAX seconds remain for it).
# Usage: BUDGET=540 PART_MAX=120 OUTDIR=$OUT bash benchmarks/gpu_scale_batch.sh "ARGS 1" "ARGS 2" ...
BUDGET=${BUDGET:-540}
PART_MAX=${PART_MAX:-120}
OUTDIR=${OUTDIR:-.}
for args in "$@"; do
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$PART_MAX" ]; then
        echo "SKIPPED (time budget): $args"
        continue
    fi
    echo "=== $args (t=${SECONDS}s)"
    timeout "$left" python3 benchmarks/gpu_scale.py $args --out "$OUTDIR/gpu_scale.jsonl" 2>&1 | grep -v "^\[transformers\]" | tail -25
done
echo "done at t=${SECONDS}s"
