#!/bin/bash
# Issue #8's GPU measurements on one device lease.
#
# Here (no CUDA toolkit needed; NVRTC compiles the kernels on the GPU machine):
#   CARGO_TARGET_DIR=/tmp/cuda-target cargo build --release --features cuda -p omnirad
#   mkdir -p dist && strip -o dist/omnirad /tmp/cuda-target/release/omnirad && xz -f dist/omnirad
# (dist/ is git-ignored). A task gets 15 minutes of device time in all, the machine's start
# included, so the default is one call that runs everything in order of importance and stops
# each step at a shared deadline (BUDGET seconds, default 500):
#   run(command="bench/gpu_session.sh all", carry=["dist"], timeout_s=560)
# Order: time to first step on an empty kernel cache (warmup), the f32 steps, PyTorch eager
# (fp32 / TF32 / bf16+SDPA), omnirad bf16, PyTorch torch.compile, pretraining, --grad-checkpoint,
# then the host's 16 CPU cores: decode + augment throughput (whether the loader keeps up with
# the GPU; needs the BUSI images: `ln -sfn ../shared/data .shared-data` here and
# carry=["dist", ".shared-data/busi-256"], 32 MiB) and the CPU fine-tuning step beside PyTorch's.
# The stages of the earlier 30-minute plan still run alone:
#   bench/gpu_session.sh cold | omnirad | torch
# Correctness before speed, where the lease allows (a separate call, ~1-4 min): `tests` runs
# omnirad-train's tests/gpu built for CUDA — the encoder's outputs and gradients (f32 and bf16),
# a fine-tuning run and pretraining steps against the CPU backend, which the CI checks only on
# wgpu (f32, lavapipe). Build it here and carry it in dist/ beside the binary (omnirad-train at
# opt-level 0, as CI builds the wgpu one: the binary's own unit then takes 35 s on 2 cores, and
# stripped and xz'd it is 9.7 MB):
#   CARGO_TARGET_DIR=/tmp/cuda-test-target cargo test --config 'profile.dev.package.omnirad-train.opt-level=0' \
#     -p omnirad-train --features cuda --test gpu --no-run
#   strip -o dist/gpu-tests /tmp/cuda-test-target/debug/deps/gpu-<hash> && xz -f dist/gpu-tests
#   run(command="bench/gpu_session.sh tests", carry=["dist"], timeout_s=300)
# Every stage writes JSON lines to $OUT/<stage>.jsonl as it goes (a step cut by the deadline
# leaves the lines before it) and the kernel cache to $OUT/kernels.tar.xz; unpack that into
# dist/kernels here so a later lease starts warm.
# On a CPU (for checking this script): DEVICE=cpu BATCH=2 IMG=32 MODEL=vit_pico STEPS=2 ...
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage: all | cold | omnirad | torch | tests}
BUDGET=${BUDGET:-500}
T0=$(date +%s)
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit_s16}
IMG=${IMG:-224}
BATCH=${BATCH:-64}
STEPS=${STEPS:-20}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
source bench/gpu_env.sh
[ "$STAGE" = cold ] || unpack_kernels
log="$OUT/$STAGE.jsonl"
: > "$log"
# Runs a step with what is left of BUDGET; a step that fails or is cut is logged as such.
bounded() {
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [ $left -le 5 ]; then
    note "{\"skipped\":\"$*\",\"why\":\"budget spent\"}"
    return 0
  fi
  timeout $left "$@" || note "{\"failed\":\"$*\",\"rc\":$?}"  # rc 124: cut at the deadline
}
note() { echo "$1" >> "$log"; echo "$1" >&2; }
speed() { # mode dtype [extra flags]
  bounded $B bench speed --model $MODEL --mode $1 --img $IMG --batch $BATCH --steps $STEPS \
    --warmup 2 --dtype $2 --device $DEVICE "${@:3}" | tee -a "$log"
}
torch_ref() { # mode [--compile]; the device machine's PyTorch is its python3 (it may have no `python`)
  bounded ${PYTHON:-python3} bench/torch_reference.py --model $MODEL --mode $1 --img $IMG \
    --batch $BATCH --steps $STEPS --warmup 2 --device $DEVICE "${@:2}" | tee -a "$log"
}
host_cpu() { # the GPU machine's CPU side: the data loader's rate and the CPU kernels
  if [ -d .shared-data/busi-256 ]; then
    for views in "" --augment; do
      bounded $B bench decode --input .shared-data/busi-256 --size $IMG --repeat 2 $views \
        | tee -a "$log"
    done
  else
    note '{"skipped":"bench decode","why":"no .shared-data/busi-256 carried"}'
  fi
  DEVICE=cpu BATCH=16 STEPS=5 speed finetune f32
  DEVICE=cpu BATCH=16 STEPS=5 torch_ref finetune --precisions fp32
}
cold_start() { # a cache carried into `all` is measured as such instead of being emptied
  local cache=cold
  if [ "$STAGE" = all ] && [ -d dist/kernels ]; then cache=carried; else rm -rf dist/kernels; fi
  local start=$(date +%s%N)
  bounded $B warmup --model $MODEL --modes infer,finetune --img $IMG --batch $BATCH \
    --device $DEVICE
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  note "{\"bench\":\"warmup\",\"cache\":\"$cache\",\"wall_ms\":$ms}"
}
case $STAGE in
  all)
    cold_start
    speed infer f32
    speed finetune f32
    for mode in infer finetune; do torch_ref $mode; done
    for mode in infer finetune; do speed $mode bf16; done
    for mode in infer finetune; do torch_ref $mode --precisions '' --compile; done
    speed pretrain f32
    torch_ref pretrain
    speed finetune f32 --grad-checkpoint
    host_cpu
    ;;
  cold)
    cold_start
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
    for mode in infer finetune pretrain; do torch_ref $mode ${COMPILE---compile}; done
    ;;
  tests)
    # The test binary configures no kernel cache: a cubecl.toml in its working directory points
    # CubeCL at the carried one. The tests use temporary directories only.
    mkdir -p /tmp/gpu-tests && xz -dc dist/gpu-tests.xz > /tmp/gpu-tests/run
    chmod +x /tmp/gpu-tests/run
    printf '[compilation]\ncache = { file = "%s" }\n[autotune]\ncache = { file = "%s" }\n' \
      "$OMNIRAD_KERNEL_CACHE" "$OMNIRAD_KERNEL_CACHE" > /tmp/gpu-tests/cubecl.toml
    (cd /tmp/gpu-tests && bounded ./run --test-threads=1) 2>&1 | tee "$OUT/tests.log"
    ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
pack_kernels
