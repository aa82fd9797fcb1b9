#!/bin/bash
# Issue #5 on the GPU machine, in one device call: a larger encoder than two CPU cores can
# pretrain (vit_pico's recipe at width 192, depth 6, 3 heads: ~23x its compute per image),
# pretrained on the PneumoniaMNIST + BreastMNIST train splits for 128 epochs, then the standard BreastMNIST
# fine-tune (official splits, epoch chosen on val by macro-F1, 3 seeds, --pool cls-mean) and
# k-NN, on the test split.
#
# The rule, fixed before the run: the final teacher is the result (no checkpoint selection); if
# the deadline cuts pretraining, the last saved teacher is used and the report says at which step.
#
# Here: build dist/omnirad.xz as in bench/gpu_session.sh, and give the device the data through
# a git-ignored link (../shared does not travel; a path through a link named in `carry` does):
#   ln -sfn ../shared/data .shared-data && echo /.shared-data >> "$(git rev-parse --git-path info/exclude)"
#   run(command="bench/gpu_breastmnist.sh", carry=["dist", ".shared-data/medmnist"], timeout_s=580)
# Outputs under $OUT: breast.jsonl (the bench lines), pretrain.log, the fine-tune/k-NN tables,
# teacher.tar.xz (the encoder) and kernels.tar.xz (unpack into dist/kernels for a warm start).
# On a CPU (for checking this script): DEVICE=cpu EPOCHS=1 FT_EPOCHS=1 SEEDS=1 bench/gpu_breastmnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-breast}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.shared-data/medmnist}
# 128: at the 13 TFLOP/s burn reached on ViT-S/16 training (H100, issue #8) 256 epochs of this
# encoder take ~300 s besides kernel compilation, more than one call leaves; with the kernel
# cache carried back, a second lease can run EPOCHS=256.
EPOCHS=${EPOCHS:-128}
BATCH=${BATCH:-256}
FT_EPOCHS=${FT_EPOCHS:-}          # empty: the fine-tuning default (BreastMNIST: 200 epochs)
SEEDS=${SEEDS:-3}
BUDGET=${BUDGET:-540}             # seconds for everything; fine-tuning gets what pretraining leaves
FT_RESERVE=${FT_RESERVE:-180}     # seconds kept back from pretraining for fine-tuning
T0=$(date +%s)
mkdir -p "$OUT"
source bench/gpu_env.sh
unpack_kernels
left() { echo $((BUDGET - ($(date +%s) - T0))); }
run=$OUT/run
cfg=$OUT/pretrain.toml
# The committed CPU recipe with the wider, deeper encoder, the carried data and a GPU batch.
sed -e "s/^epochs = 16/epochs = $EPOCHS/" -e "s/^batch_size = 64/batch_size = $BATCH/" \
    -e "s|^layer_scale_init = 0.0|layer_scale_init = 0.0\nembed_dim = 192\ndepth = 6\nnum_heads = 3|" \
    -e "s|\"../../shared/data/medmnist/|\"$PWD/$DATA/|" configs/medmnist-pico.toml > "$cfg"
grep -q "embed_dim = 192" "$cfg" && grep -q "$PWD/$DATA/breastmnist.npz" "$cfg"

rc=0
timeout $(( $(left) - FT_RESERVE )) $B pretrain --config "$cfg" --out $run --device $DEVICE \
  > $OUT/pretrain.log 2>&1 || rc=$?
echo "{\"bench\":\"pretrain\",\"rc\":$rc,\"wall_s\":$(( $(date +%s) - T0 ))}" | tee $OUT/breast.jsonl
tail -3 $OUT/pretrain.log
enc=$run/teacher
[ -f $enc/model.safetensors ] || { echo "no teacher was saved" >&2; exit 1; }

bench() { # mode [flags]
  local l=$(left)
  [ $l -gt 5 ] || { echo "{\"skipped\":\"$1\"}" | tee -a $OUT/breast.jsonl; return 0; }
  timeout $l $B bench medmnist --data $DATA --datasets breastmnist --model $enc --mode $1 \
    --device $DEVICE --out $OUT/$1 "${@:2}" 2>&1 | tail -12 \
    || echo "{\"failed\":\"$1\"}" | tee -a $OUT/breast.jsonl
}
bench finetune --seeds $SEEDS --pool cls-mean ${FT_EPOCHS:+--epochs $FT_EPOCHS}
bench knn
tar -cJf $OUT/teacher.tar.xz -C $run teacher
pack_kernels
