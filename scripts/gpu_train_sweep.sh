#!/usr/bin/env bash
# Training variants of the deep Emotion classifiers side by side on one GPU (issue 15): each
# argument is NAME=FLAGS for scripts/train_classifier.py; every run trains T seconds (default 300)
# at batch 128 with the validation accuracy every 150 steps, and writes $OUT/NAME.log.
#
#   T=420 bash scripts/gpu_train_sweep.sh "m1_amp_1e-4=--preset mamba-130m --amp --lr 1e-4" \
#       "m2_amp_1e-4=--preset mamba2-130m --amp --lr 1e-4"
#
# Packages as in scripts/gpu_deep_study.sh: .gpusite/site.tar.xz unpacked, mamba-ssm apart so that
# only the Mamba1 model (preset mamba-130m) uses its selective_scan_fn; the data in .gpudata/emotion.
# Memory: transformers' torch Mamba2 path takes 25-40 GB per run at batch 128; four runs fit an
# H200, eight do not.
set -u
cd "$(dirname "$0")/.."
R=$PWD T=${T:-300} OUT=${OUT:-$R/runs/sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ ! -d /tmp/site/captum ]; then
    mkdir -p /tmp/site /tmp/site_ssm && tar -xJf .gpusite/site.tar.xz -C /tmp/site
    mv /tmp/site/mamba_ssm* /tmp/site/selective_scan_cuda* /tmp/site_ssm/
    for d in .gpudata/transformers_models/*/; do [ -d "$d" ] && cp -r "$d" /tmp/site/transformers/models/; done
fi
for spec in "$@"; do
    name=${spec%%=*} flags=${spec#*=}
    py=/tmp/site:$R
    [[ " $flags " == *" mamba-130m "* || " $flags " == *"--arch mamba "* ]] && py=/tmp/site:/tmp/site_ssm:$R
    # shellcheck disable=SC2086
    PYTHONPATH=$py timeout $((T + 60)) python3 scripts/train_classifier.py --data .gpudata/emotion --device cuda --seed 0 \
        --batch 128 --time-budget "$T" --epochs 60 --eval-every 150 --out "/tmp/runs/$name" $flags >"$OUT/$name.log" 2>&1 &
done
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -E "steps|step [0-9]+:|epoch|best|Error" "$f" | tail -14; done
