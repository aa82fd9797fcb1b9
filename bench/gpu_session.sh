#!/bin/bash
# Issue #8's GPU measurements, split into stages that each fit one 10-minute device call.
#
# Here (no CUDA toolkit needed; NVRTC compiles the kernels on the GPU machine):
#   CARGO_TARGET_DIR=/tmp/cuda-target cargo build --release --features cuda -p omnirad
#   mkdir -p dist && strip -o dist/omnirad /tmp/cuda-target/release/omnirad && xz -f dist/omnirad
# (dist/ is git-ignored). Then one device call per stage, carrying dist/:
#   bench/gpu_session.sh cold    # time to first step with an empty kernel cache, then the f32 steps
#   bench/gpu_session.sh omnirad # bf16, pretrain, --grad-checkpoint (warm cache)
#   bench/gpu_session.sh torch   # bench/torch_reference.py: eager fp32 / TF32 / bf16+SDPA / compile
# Each stage writes JSON lines to $OUT/<stage>.jsonl and the kernel cache to $OUT/kernels.tar.xz;
# unpack that into dist/ here before the next call so later stages start warm.
# On a CPU (for checking this script): DEVICE=cpu BATCH=2 IMG=32 MODEL=vit_pico STEPS=2 ...
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage: cold | omnirad | torch}
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit_s16}
IMG=${IMG:-224}
BATCH=${BATCH:-64}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
if [ -f dist/omnirad.xz ]; then
  B=/tmp/omnirad-gpu
  xz -dc dist/omnirad.xz > $B && chmod +x $B
else
  B=${OMNIRAD:-./target/release/omnirad}
fi
export OMNIRAD_KERNEL_CACHE=$PWD/dist/kernels
if [ -f dist/kernels.tar.xz ] && [ "$STAGE" != cold ]; then
  mkdir -p dist/kernels && tar -xJf dist/kernels.tar.xz -C dist/kernels
fi
log="$OUT/$STAGE.jsonl"
: > "$log"
speed() { # mode dtype [extra flags]
  $B bench speed --model $MODEL --mode $1 --img $IMG --batch $BATCH --steps $STEPS --warmup 2 \
    --dtype $2 --device $DEVICE "${@:3}" | tee -a "$log"
}
case $STAGE in
  cold)
    rm -rf dist/kernels
    start=$(date +%s%N)
    $B warmup --model $MODEL --modes infer,finetune --img $IMG --batch $BATCH --device $DEVICE
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "{\"bench\":\"warmup\",\"cache\":\"cold\",\"wall_ms\":$ms}" | tee -a "$log"
    speed infer f32
    speed finetune f32
    ;;
  omnirad)
    for mode in infer finetune; do speed $mode bf16; done
    speed finetune f32 --grad-checkpoint
    speed pretrain f32
    speed pretrain bf16
    ;;
  torch)
    for mode in infer finetune pretrain; do
      ${PYTHON:-python} bench/torch_reference.py --model $MODEL --mode $mode --img $IMG \
        --batch $BATCH --steps $STEPS --warmup 2 --device $DEVICE ${COMPILE---compile} | tee -a "$log"
    done
    ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
[ -d dist/kernels ] && tar -cJf "$OUT/kernels.tar.xz" -C dist/kernels . || true
