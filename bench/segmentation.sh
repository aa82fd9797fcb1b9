#!/bin/bash
# Segmentation evidence for BENCHMARKS.md: frozen-encoder heads on BUSI and DRIVE (pretrained
# and random-init vit_pico), then the two bundles whose test overlays are in
# docs/examples/segmentation. Needs runs/pico/teacher (see the pretraining section).
set -e
cd "$(dirname "$0")/.."
B=${OMNIRAD:-./target/release/omnirad}
for m in runs/pico/teacher vit_pico; do
  tag=$([ "$m" = vit_pico ] && echo random || echo pretrained)
  $B bench medsegbench --data ../shared/data --datasets busi --model $m --heads adapter,linear \
    --size 64 --epochs 20 --out runs/seg-busi-$tag
  $B bench medsegbench --data ../shared/data --datasets drive --model $m --heads adapter,linear \
    --size 64 --overlap 16 --views-per-image 16 --epochs 20 --out runs/seg-drive-$tag
done
# The encoder fine-tuned at a tenth of the head's learning rate.
$B bench medsegbench --data ../shared/data --datasets busi --model runs/pico/teacher --heads adapter \
  --backbone-lr 0.1 --size 64 --epochs 20 --out runs/seg-busi-ft
# Bundles with overlays (the same settings as the adapter rows, so the same test Dice).
$B segment train --data ../shared/data/drive --model runs/pico/teacher --out runs/seg-drive-bundle \
  --size 64 --window sliding --overlap 16 --views-per-image 16 --epochs 20 --overlays 20
$B segment train --data ../shared/data/busi-256 --model runs/pico/teacher --out runs/seg-busi-bundle \
  --size 64 --epochs 20 --overlays 156
