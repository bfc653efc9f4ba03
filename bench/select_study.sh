#!/usr/bin/env bash
# Selection quality of every head method x selection method x answer-position setting on every target
# of the built-in pool (bench/select_quality.py), for one seed:
#   bash bench/select_study.sh 100          # the choice seed the defaults were chosen on
#   bash bench/select_study.sh 0 gradient_logratio activation "" all   # a held-out seed: the default heads
#        (gradient and gradient_layer come with them: same gradients) + random heads, activation, all positions
# Writes runs/select_study/seed<seed>/<target>.json; a finished target is skipped on a rerun.
# Summarise with: python bench/choose_defaults.py runs/select_study/seed<seed>
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
seed=${1:-100}
# $2 and $3 (head methods, selection methods) are accepted for the old command lines: every gradient
# contrast, random head set and activation score is computed from the same feature pass anyway
proxy=${4-taylor}
positions=${5:-all,content}
out=runs/select_study/seed$seed
mkdir -p "$out"
for t in addition capitals chat code sentiment units dates; do
  [ -f "$out/$t.json" ] && grep -q '"total_s"' "$out/$t.json" && continue
  python bench/select_quality.py --target "$t" --seed "$seed" --pool-size 400 --probe-size 64 \
    --max-length 256 --batch-size 8 --positions "$positions" --no-alignment --random-draws 10 \
    --proxy-methods "$proxy" --proxy-positions "$positions" --threads 1 --json "$out/$t.json" > "$out/$t.log" 2>&1
done
