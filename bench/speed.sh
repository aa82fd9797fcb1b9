#!/bin/bash
# Side-by-side step speed for BENCHMARKS.md: `omnirad bench speed` and bench/torch_reference.py
# on the same machine, same architecture, same batch, one JSON line per run.
#   DEVICE=cuda MODEL=vit_s16 IMG=224 BATCH=64 STEPS=20 bench/speed.sh > runs/speed.jsonl
#   python3 bench/speed_table.py runs/speed.jsonl    # BENCHMARKS.md's side-by-side table
# On the GPU machine also set COMPILE=--compile. CPU defaults are small enough for 2 cores.
# GRAD_CKPT=--grad-checkpoint trains with activation recomputation on both sides.
# ROUNDS=3 repeats everything (noisy VMs); DTYPES="f32 bf16 bf16-noamx" adds bf16 with AMX off
# (OMNIRAD_AMX=0: gemmkit's kernel); TORCH_PRECISIONS=fp32,bf16 limits PyTorch's runs.
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
for round in $(seq ${ROUNDS:-1}); do
for mode in $MODES; do
  for dtype in ${DTYPES:-f32 bf16}; do
    amx=$([ $dtype = bf16-noamx ] && echo 0 || echo 1)
    OMNIRAD_AMX=$amx $B bench speed --model $MODEL --mode $mode --img $IMG --batch $BATCH \
      --steps $STEPS --warmup $WARMUP --dtype ${dtype%-noamx} --device $DEVICE $GRAD_CKPT 2>/dev/null
  done
  $PY bench/torch_reference.py --model $MODEL --mode $mode --img $IMG --batch $BATCH \
    --steps $STEPS --warmup $WARMUP --device $DEVICE $COMPILE $GRAD_CKPT \
    ${TORCH_PRECISIONS:+--precisions $TORCH_PRECISIONS} 2>/dev/null
done
done
