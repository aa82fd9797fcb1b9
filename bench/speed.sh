#!/bin/bash
# Side-by-side step speed for BENCHMARKS.md: `omnirad bench speed` and bench/torch_reference.py
# on the same machine, same architecture, same batch, one JSON line per run.
#   DEVICE=cuda MODEL=vit_s16 IMG=224 BATCH=64 STEPS=20 bench/speed.sh > runs/speed.jsonl
# On the GPU machine also set COMPILE=--compile. CPU defaults are small enough for 2 cores.
# GRAD_CKPT=--grad-checkpoint trains with activation recomputation on both sides.
set -e
cd "$(dirname "$0")/.."
B=${OMNIRAD:-./target/release/omnirad}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-vit_s16}
IMG=${IMG:-224}
BATCH=${BATCH:-8}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
MODES=${MODES:-infer finetune pretrain}
for mode in $MODES; do
  for dtype in f32 bf16; do
    $B bench speed --model $MODEL --mode $mode --img $IMG --batch $BATCH --steps $STEPS \
      --warmup $WARMUP --dtype $dtype --device $DEVICE $GRAD_CKPT 2>/dev/null
  done
  $PY bench/torch_reference.py --model $MODEL --mode $mode --img $IMG --batch $BATCH \
    --steps $STEPS --warmup $WARMUP --device $DEVICE $COMPILE $GRAD_CKPT 2>/dev/null
done
