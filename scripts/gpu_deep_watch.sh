#!/usr/bin/env bash
# One device call of the deep-model study (issue 15): start scripts/gpu_deep_study.sh in the
# background unless it already runs on this machine (a previous call's pipeline, when the
# machine stayed warm and kept its processes), watch it for WATCH seconds, then copy its small
# results into $OUT (the call's return folder). Calls made back to back on one warm machine
# therefore either continue one long pipeline or resume it (finished training is skipped,
# studies resume from their per-example records).
#
#   BUDGET=1500 WATCH=540 bash scripts/gpu_deep_watch.sh     # first call: a pipeline of 1500 s
#   BUDGET=520 WATCH=540 bash scripts/gpu_deep_watch.sh      # later calls: BUDGET only if it must restart
#
# Everything else (TRAIN_S, ONLY, TABLE, RUNS, ...) is passed through to gpu_deep_study.sh;
# SMOKE=1 runs its CPU smoke test (tiny models) instead.
set -u
cd "$(dirname "$0")/.."
WATCH=${WATCH:-540}
PIPE_OUT=${PIPE_OUT:-$PWD/runs/gpu-deep-out}
PIDFILE=${PIDFILE:-$PWD/runs/deep-pipeline.pid}
CALL_OUT=${OUT:-$PWD/runs/gpu-deep-call}
mkdir -p "$PIPE_OUT" "$CALL_OUT" runs
T0=$SECONDS

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if running; then
    echo "the pipeline of an earlier call still runs (pid $(cat "$PIDFILE")): watching it"
else
    [ -f "$PIDFILE" ] && echo "the pipeline of an earlier call is gone: resuming it with BUDGET=${BUDGET:-540}"
    OUT=$PIPE_OUT setsid nohup bash scripts/gpu_deep_study.sh ${SMOKE:+--smoke} >>runs/gpu-deep-console.txt 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    echo "started the pipeline (pid $!, BUDGET=${BUDGET:-540})"
fi
while [ $((SECONDS - T0)) -lt "$WATCH" ] && running; do
    sleep 10
done
running && echo "still running after ${WATCH}s" || echo "the pipeline ended"
echo "--- timeline"
cat "$PIPE_OUT/timeline.txt" 2>/dev/null
echo "--- training (validation accuracy by step)"
for f in "${RUNS:-runs/deep}"/*/train-*.log; do
    [ -f "$f" ] && echo "$f: $(grep -E '^(step|epoch|best)' "$f" | tail -n 4 | tr '\n' '|')"
done
echo "--- studies: progress, for the rate"
for d in "${RUNS:-runs/deep}"/*/study "${RUNS:-runs/deep}"/*/table/replacement-*; do
    [ -d "$d" ] || continue
    if ls "$d"/progress.rank* >/dev/null 2>&1; then   # sharded: the ranks' counters
        echo "$d: $(awk '{s += $1} END {print s + 0}' "$d"/progress.rank*) at ${SECONDS}s"
    else   # one process: (method, example) records written and examples started
        echo "$d: $(cat "$d"/results*.jsonl 2>/dev/null | wc -l) method x example records, $(cat "$d"/examples*.jsonl 2>/dev/null | wc -l) examples at ${SECONDS}s"
    fi
done
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null
# at most 8 files come back: the per-model archives, the timeline, the console's tail
cp "$PIPE_OUT"/*.tgz "$CALL_OUT"/ 2>/dev/null
cp "$PIPE_OUT/timeline.txt" "$CALL_OUT"/ 2>/dev/null
tail -n 200 runs/gpu-deep-console.txt >"$CALL_OUT/console-tail.txt" 2>/dev/null
ls -la "$CALL_OUT"
