#!/usr/bin/env bash
# Issue 15 on one GPU in one call: train the three deep Emotion classifiers (Mamba-130M shape,
# Mamba2-130M shape, a Bamba hybrid), run the faithfulness study on all 2000 test examples for
# each, the reference x replacement table for the Mamba1 model, and the long-range test
# (2K-16K tokens), all within BUDGET seconds, writing small results as they finish.
#
#   bash scripts/gpu_deep_study.sh            # on the H200 (uses .gpusite/site.tar.xz, .gpudata/)
#   bash scripts/gpu_deep_study.sh --smoke    # on the CPU: tiny models, a few examples (minutes)
#   ONLY=mamba-130m bash scripts/gpu_deep_study.sh   # one model (TABLE=0: without the reference table)
#
# Weights and full study folders stay in $RUNS (default runs/deep, git-ignored); a second call
# on the same machine skips finished training and resumes the studies. Small results are packed
# into $OUT/<model>.tgz (rewritten every PACK_EVERY seconds and at the end), with
# $OUT/timeline.txt. Every process ends by its deadline; a study stopped by it is summarized over
# the examples that every method finished (run_emotion_study.py --finalize-partial).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-$ROOT/runs/gpu-deep-out}
RUNS=${RUNS:-$ROOT/runs/deep}
BUDGET=${BUDGET:-540}           # seconds from start to the last packed result
TRAIN_S=${TRAIN_S:-400}         # seconds of training per model (the three train side by side; the hybrid learned in 400 s)
TRAIN_BATCH=${TRAIN_BATCH:-128} TRAIN_LR=${TRAIN_LR:-5e-4}   # a large batch: more texts per launch-bound step; 5e-4: the pilot's Mamba1 loss rose at 1e-3
# (train_classifier.py initializes with std 0.02 since the runs of 2026-12-01, where the pure
# stacks at transformers' 0.1 did not learn: docs/results.md, "Deeper models")
STUDY_END=${STUDY_END:-$((BUDGET - 75))}   # every study and long-range process stops here
PACK_EVERY=${PACK_EVERY:-45}
EVAL_EVERY=${EVAL_EVERY:-150}   # validation accuracy in the training logs every N steps
# the H200 pilot of 2026-12-01: BUDGET=140 TRAIN_S=45 STUDY_END=115 TABLE=0 PACK_EVERY=20 TRAIN_BATCH=32
# A full run needs two calls on one machine (the second right after the first, while it is warm: it
# skips the training and resumes the studies): see docs/results.md, "Deeper models".
T0=$(date +%s)
mkdir -p "$OUT" "$RUNS"
el() { echo $(($(date +%s) - T0)); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/timeline.txt"; }
left() { local s=$((STUDY_END - $(el))); [ $s -lt 1 ] && s=1; echo $s; }

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ $SMOKE = 1 ]; then
    DEV=cpu
    DATA=${DATA:-$ROOT/../shared/data/emotion}
    [ -d "$DATA" ] || DATA=/work/shared/data/emotion
    PY_BASE=${SITE:+$SITE:}$ROOT PY_SSM=${SITE:+$SITE:}$ROOT   # SITE: a trimmed site to test with
    N=24 TABLE_N=16
    TINY=(--hidden 32 --layers 2 --state 4 --head-dim 8 --attn-heads 2 --attn-layers 1 --max-steps 20 --batch 16)
    LENGTHS=64,128 LONG_NEEDLES=2 EVAL_EVERY=10
else
    DEV=cuda
    DATA=${DATA:-$ROOT/.gpudata/emotion}
    if [ ! -d /tmp/site/captum ]; then
        mkdir -p /tmp/site && tar -xJf .gpusite/site.tar.xz -C /tmp/site
        # mamba-ssm apart: the Mamba1 model uses its selective_scan_fn (a CUDA kernel, no
        # autotuning; train_classifier.py trains in eval mode, as mamba_inner_fn needs the absent
        # causal-conv1d); Mamba2 and the hybrid run transformers' torch path (its SSD Triton
        # kernels would autotune for minutes)
        mkdir -p /tmp/site_ssm && mv /tmp/site/mamba_ssm* /tmp/site/selective_scan_cuda* /tmp/site_ssm/
    fi
    # the carried transformers (models trimmed) lacks models/encoder_decoder, which AutoTokenizer
    # imports (the first pilot failed there): transformers 5.24's copy from .gpudata/transformers_models/,
    # else the machine's own transformers' (5.17; only its config class is imported)
    for d in .gpudata/transformers_models/*/; do
        [ -d "$d" ] && [ ! -d "/tmp/site/transformers/models/$(basename "$d")" ] && cp -r "$d" /tmp/site/transformers/models/
    done
    if [ ! -d /tmp/site/transformers/models/encoder_decoder ]; then
        own=$(cd / && python3 -c "import os, transformers; print(os.path.dirname(transformers.__file__))")
        cp -r "$own/models/encoder_decoder" /tmp/site/transformers/models/
    fi
    PYTHONPATH=/tmp/site python3 -c "from transformers import AutoTokenizer" || { log "AutoTokenizer does not import"; exit 1; }
    [ -f .gpudata/tc.tgz ] && mkdir -p /tmp/tc && tar -xzf .gpudata/tc.tgz -C /tmp/tc 2>/dev/null
    PY_BASE=/tmp/site:$ROOT PY_SSM=/tmp/site:/tmp/site_ssm:$ROOT
    N=0 TABLE_N=${TABLE_N:-400}
    TINY=(--epochs 60 --time-budget "$TRAIN_S" --batch "$TRAIN_BATCH")
    LENGTHS=2048,4096,8192,16384 LONG_NEEDLES=8
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
fi
log "start: smoke=$SMOKE device=$DEV data=$DATA budget=${BUDGET}s study_end=${STUDY_END}s"

read -r -a MODELS <<<"${ONLY:-mamba-130m mamba2-130m hybrid-130m}"   # ONLY="mamba-130m": one model
declare -A PYP=([mamba-130m]=$PY_SSM [mamba2-130m]=$PY_BASE [hybrid-130m]=$PY_BASE)
# the LRP variants: all four ablations on Mamba1; on the slower Mamba2/hybrid torch path only the SSM rule's
declare -A LRP_SET=([mamba-130m]=mambalrp,gxi,lrp_ln,no_activation_rule,no_ssm_rule,no_gate_rule,no_norm_rule,saliency
                    [mamba2-130m]=mambalrp,gxi,lrp_ln,no_ssm_rule,saliency [hybrid-130m]=mambalrp,mambalrp_cp,gxi,lrp_ln,no_ssm_rule,saliency)
REF_SET=integrated_gradients,smoothgrad,feature_ablation,kernelshap
declare -A ATT=([mamba-130m]=mamba_attr,gw_rollout,implicit_attr [mamba2-130m]=implicit_attn,implicit_attr [hybrid-130m]=)
# the baselines' settings on the GPU (recorded in each study's config.json)
SETTINGS=(--ig-steps 20 --smoothgrad-samples 10 --kernelshap-samples 100 --reference matched
          --perturbations-per-eval 128 --tf32 --no-progress --device "$DEV" --data "$DATA")
# which forward the methods and curves run (the same function either way): Mamba1 the model's own
# (mamba-ssm's selective_scan_fn); Mamba2 and the hybrid the package's scan with plain-gradient
# rules, since transformers' torch SSD path materialises a (chunk x chunk x heads x state) product
# per chunk and pads texts to the chunk: on the CPU (6 layers of d_model 768) a forward and
# backward pass took 7.7x the package's time at 64 x 32 tokens, 1.3x at 16 x 64, and saved 1.7x
# its bytes (benchmarks/study_forward.py; docs/results.md, "Deeper models")
declare -A FORWARD=([mamba-130m]=--model-forward [mamba2-130m]= [hybrid-130m]=)
# per model: ranks on the one GPU, rows per gradient pass (the package's Mamba2 scan saves about
# 0.15 MB per token and layer for the backward pass, 3.6 MB at 24 layers; transformers' torch SSD
# path 0.26; mamba-ssm's Mamba1 kernel about 1.5 MB per token in all) and the memory cap of each
# rank (a share of the GPU; longrange runs uncapped beside them)
# (RANKS_PER_MODEL: fewer processes time-slice the GPU less; on 2026-12-02 about 15 processes
# shared it and every study process was CPU-bound, spinning at synchronisations)
R=${RANKS_PER_MODEL:-1}
declare -A RANKS=([mamba-130m]=$R [mamba2-130m]=$R [hybrid-130m]=$R)
# (one rank per model by default: Mamba1 then takes 160 rows per IG and SmoothGrad pass, about
# 15 GB at 64 tokens; Mamba2 and the hybrid 32 rows, about 9 GB at 64 tokens (the hybrid's
# 24 layers save about 4.3 MB per token through the package's scan, measured on the CPU); each
# rank's memory cap is 0.28 / R of the GPU; in run 2 the three studies used 28-31 GB together)
MEM=$(awk "BEGIN {print ${MEM_SHARE:-0.28} / $R}")   # MEM_SHARE: the GPU share of one model's ranks together
declare -A BATCHING=([mamba-130m]="--batch-size 32 --ig-internal-batch $((160 / R)) --smoothgrad-per-pass $(((5 + R - 1) / R)) --memory-fraction $MEM"
                     [mamba2-130m]="--batch-size 32 --ig-internal-batch $((32 / R)) --smoothgrad-per-pass 1 --memory-fraction $MEM"
                     [hybrid-130m]="--batch-size 32 --ig-internal-batch $((32 / R)) --smoothgrad-per-pass 1 --memory-fraction $MEM")
[ $SMOKE = 1 ] && RANKS=([mamba-130m]=2 [mamba2-130m]=2 [hybrid-130m]=2)

pack() {  # small results, one archive per model (atomic: a timeout never leaves half a file)
    local m
    for m in "${MODELS[@]}"; do
        [ -d "$RUNS/$m" ] || continue
        (cd "$RUNS" && tar czf "$OUT/$m.tmp" --exclude='*.jsonl' --exclude='*.safetensors' --exclude='*.bin' \
            --exclude='tokenizer*' --exclude='special_tokens_map.json' --exclude='progress.rank*' --exclude='*.tmp' \
            --exclude='vocab*' "$m" 2>/dev/null) && mv "$OUT/$m.tmp" "$OUT/$m.tgz"
    done
}
(while sleep "$PACK_EVERY"; do pack; done) &
PACKER=$!

# each model's recipe: the pure stacks train on the class at every position (on 2026-12-02 that
# won over the last token alone: Mamba1 0.897 against 0.8125 test accuracy, Mamba2 0.8875 against
# 0.7395; docs/results.md, "Deeper models"). ALT_RECIPES=1 trains a second recipe beside the
# first (ALT) and studies the one with the better validation accuracy.
declare -A RECIPE=([mamba-130m]="--every-position" [mamba2-130m]="--every-position" [hybrid-130m]=)
declare -A ALT=([mamba-130m]= [mamba2-130m]= [hybrid-130m]=)
[ "${ALT_RECIPES:-0}" = 1 ] && ALT=([mamba-130m]="--no-every-position" [mamba2-130m]="--no-every-position" [hybrid-130m]=)

train_one() {  # $1 model, $2 folder name under runs/<model>, the rest: extra flags
    local name=$1 sub=$2 dir=$RUNS/$1
    shift 2
    PYTHONPATH=${PYP[$name]} python3 scripts/train_classifier.py --data "$DATA" --preset "$name" --device "$DEV" --amp \
        --lr "$TRAIN_LR" --seed 0 --out "$dir/$sub" --eval-every "$EVAL_EVERY" "${TINY[@]}" "$@" >"$dir/train-$sub.log" 2>&1
    local rc=$?
    log "$name: training $sub ($*) rc=$rc $(grep -h 'test acc' "$dir/train-$sub.log" | tail -1)"
    return $rc
}

train() {  # $1 model name: trains unless runs/<name>/model has a finished model
    local name=$1 dir=$RUNS/$1
    mkdir -p "$dir"
    if [ -f "$dir/model/metrics.json" ]; then log "$name: trained already"; return 0; fi
    log "$name: training"
    local recipe=(${RECIPE[$name]})
    if [ -z "${ALT[$name]}" ]; then
        train_one "$name" model-a "${recipe[@]}" || return 1
    else
        local extra=(${ALT[$name]})
        train_one "$name" model-a "${recipe[@]}" & local a=$!
        train_one "$name" model-b "${extra[@]}" & local b=$!
        wait $a; wait $b
    fi
    # the better validation accuracy wins (a: the recipe; b: the alternative, ${ALT[$name]:-none})
    local best
    best=$(python3 - "$dir" <<'PY'
import json, os, sys
acc = {}
for sub in ("model-a", "model-b"):
    f = os.path.join(sys.argv[1], sub, "metrics.json")
    if os.path.isfile(f):
        acc[sub] = json.load(open(f))["val_accuracy"]
print(max(acc, key=acc.get) if acc else "")
PY
)
    [ -n "$best" ] || { log "$name: no recipe finished"; return 1; }
    ln -sfn "$best" "$dir/model"
    log "$name: the study uses $best ($(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('val', m['val_accuracy'], 'test', m['test_accuracy'])" "$dir/model/metrics.json"))"
}

study() {  # $1 model: the study on all test examples, sharded over NPROC ranks on the one GPU
    local name=$1 dir=$RUNS/$1 methods="${LRP_SET[$1]},$REF_SET,${ATT[$1]:+${ATT[$1]},}random"
    local args=(--model "$dir/model" --examples "$N" --methods "$methods" --out "$dir/study" "${SETTINGS[@]}" ${FORWARD[$name]})
    local batching=(${BATCHING[$name]})
    [ $SMOKE = 1 ] && batching=("${batching[@]:0:6}")  # no memory cap on the CPU
    rm -f "$dir/study.finished"
    log "$name: study ($methods)"
    echo "torchrun --standalone --nproc_per_node ${RANKS[$name]} scripts/run_emotion_study.py ${args[*]} ${batching[*]}" >"$dir/study.cmd"
    PYTHONPATH=${PYP[$name]} timeout "$(left)" python3 -m torch.distributed.run --standalone --nproc_per_node "${RANKS[$name]}" \
        scripts/run_emotion_study.py "${args[@]}" "${batching[@]}" >"$dir/study.log" 2>&1
    local rc=$?
    log "$name: study rc=$rc"
    if [ $rc -ne 0 ] || [ ! -f "$dir/study/summary.json" ]; then
        PYTHONPATH=${PYP[$name]} python3 scripts/run_emotion_study.py "${args[@]/$DEV/cpu}" "${batching[@]:0:6}" --finalize-partial \
            >>"$dir/study.log" 2>&1
        log "$name: partial summary rc=$? ($(grep -h 'summary of' "$dir/study.log" | tail -1))"
    fi
}

table() {  # $1 replacement: the Mamba1 reference x replacement table, one process per replacement
    local name=mamba-130m dir=$RUNS/mamba-130m kind=$1
    local args=(--model "$dir/model" --examples "$TABLE_N" --methods "mambalrp,gxi,lrp_ln,saliency,implicit_attr,random,$REF_SET"
                --out "$dir/table" --reference-table --references zero,mean,token:1 --replacements "$kind" "${SETTINGS[@]}" --model-forward)
    local batching=(--batch-size 32 --ig-internal-batch 40 --smoothgrad-per-pass 2)
    [ $SMOKE = 0 ] && batching+=(--memory-fraction 0.05)
    echo "python3 scripts/run_emotion_study.py ${args[*]} --no-figures ${batching[*]}" >"$dir/table-$kind.cmd"
    PYTHONPATH=$PY_SSM timeout "$(left)" python3 scripts/run_emotion_study.py "${args[@]}" --no-figures "${batching[@]}" \
        >"$dir/table-$kind.log" 2>&1
    log "$name: table $kind rc=$?"
}

table_finish() {  # the table over whatever the three replacement studies finished
    local dir=$RUNS/mamba-130m
    PYTHONPATH=$PY_SSM python3 scripts/run_emotion_study.py --model "$dir/model" --examples "$TABLE_N" \
        --methods "mambalrp,gxi,lrp_ln,saliency,implicit_attr,random,$REF_SET" --out "$dir/table" --reference-table \
        --references zero,mean,token:1 --replacements token,zero,mean "${SETTINGS[@]/$DEV/cpu}" --model-forward --batch-size 32 \
        --ig-internal-batch 40 --smoothgrad-per-pass 2 --finalize-partial \
        >"$dir/table-finish.log" 2>&1
    log "mamba-130m: table finished rc=$? ($(grep -ch 'summary of' "$dir/table-finish.log") replacements)"
}

lr_run() {  # $1 model, $2 lengths: the long-range test (resumes: a run with more lengths adds them)
    local name=$1 dir=$RUNS/$1
    local args=(longrange --model "$dir/model" --data "$DATA" --split test --needles "$LONG_NEEDLES" --n-distances 6
                --filler token --batch-size 1 --recompute on --device "$DEV" --out "$dir/longrange" --lengths "$2")
    echo "python3 -m captum_mambalrp ${args[*]}" >>"$dir/longrange.cmd"
    PYTHONPATH=${PYP[$name]} timeout "$(left)" python3 -m captum_mambalrp "${args[@]}" >>"$dir/longrange.log" 2>&1
    log "$name: longrange ($2) rc=$?"
}

longrange() {  # $1 model: needle in a haystack of [UNK] tokens, 2K-8K tokens, then 16K added
    lr_run "$1" "${LENGTHS%,*}"   # each stage writes its summary: a time limit keeps the finished lengths
    # the hybrid's attention at 16K (eager, fp32) needs tens of GB: it runs after its study (pipeline)
    [ "$1" != hybrid-130m ] && lr_run "$1" "$LENGTHS"
}

pipeline() {  # $1 model: train, its study, then (LONGRANGE=0: not) its long range
    # one after the other: on 2026-12-02 the study, the long range and the table side by side (about
    # 15 processes on the GPU) ran every study process at a fraction of its speed
    local name=$1
    train "$name" || return 1
    study "$name"
    touch "$RUNS/$name/study.finished"
    [ "${LONGRANGE:-1}" = 0 ] && return 0
    longrange "$name"
    [ "$name" = hybrid-130m ] && [ "$(left)" -gt 30 ] && lr_run "$name" "$LENGTHS"
}

PIDS=()
for m in "${MODELS[@]}"; do
    pipeline "$m" &
    PIDS+=($!)
done
# the Mamba1 table once its study has ended (TABLE=0: none)
[ "${TABLE:-1}" != 0 ] && [[ " ${MODELS[*]} " == *" mamba-130m "* ]] && (
    while [ ! -f "$RUNS/mamba-130m/study.finished" ] && [ "$(el)" -lt "$STUDY_END" ]; do sleep 2; done
    if [ -f "$RUNS/mamba-130m/study.finished" ]; then
        for k in token zero mean; do table $k & done
        wait
        table_finish
    fi
) &
PIDS+=($!)
wait "${PIDS[@]}"
kill $PACKER 2>/dev/null
for m in "${MODELS[@]}"; do  # the logs' tails beside the results
    for f in "$RUNS/$m"/*.log; do [ -f "$f" ] && tail -n 40 "$f" >"${f%.log}.tail.txt"; done
done
nvidia-smi >"$OUT/nvidia-smi-end.txt" 2>&1
log "done"
pack
ls -la "$OUT"
