#!/usr/bin/env python3
"""Where a CPU step's time goes, by omnirad op, from a `perf record --call-graph dwarf` profile.

    cargo build --release -p omnirad      # with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
    RAYON_NUM_THREADS=1 perf record -F 200 -e cpu-clock --call-graph dwarf,65528 -o perf.data \\
        target/release/omnirad bench speed --model vit_s16 --mode finetune --img 224 --batch 8 \\
        --steps 4 --warmup 1 --dtype f32
    perf script -i perf.data | python3 bench/perf_ops.py --hz 200 --steps 5 [--leaves 15]

Each sample is charged to the first group whose pattern appears anywhere in its stack (model
set-up first, so that random initialisation is not charged to a step); ms per step = samples /
hz / steps (steps: warm-up included, as the profile covers them). One thread, so that the
samples of rayon's tasks add up to the step's time. `--leaves N` also lists the leaf functions
of the samples no group claims; `--stack PATTERN` adds the time of the samples whose stack has
PATTERN, in or out of a group (e.g. `from_f32s`, the rounding of whole tensors to bf16).
"""
import argparse
import collections
import sys

GROUPS = [
    ("model set-up", ("random", "resolve_model")),
    ("optimizer", ("optim::",)),
    ("linear", ("linear::",)),
    ("mlp", ("mlp::",)),
    ("attention", ("attention::",)),
    ("permute", ("permute::",)),
    ("layernorm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("residual", ("residual",)),
    ("DINO head / loss", ("dino_head", "loss::", "weight_norm")),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hz", type=float, required=True, help="perf record's -F")
    ap.add_argument("--steps", type=float, required=True, help="steps profiled, warm-up included")
    ap.add_argument("--leaves", type=int, default=0)
    ap.add_argument(
        "--stack",
        action="append",
        default=[],
        help="also the ms per step of the samples whose stack contains this (repeatable)",
    )
    args = ap.parse_args()
    per_sample = 1e3 / args.hz / args.steps
    counts, leaves, found = collections.Counter(), collections.Counter(), collections.Counter()
    for sample in sys.stdin.read().split("\n\n"):
        frames = [l.strip() for l in sample.strip().split("\n")][1:]
        if not frames:
            continue
        stack = "\n".join(frames)
        for p in args.stack:
            if p in stack:
                found[p] += 1
        for name, patterns in GROUPS:
            if any(p in stack for p in patterns):
                break
        else:
            name = "other"
            leaves[frames[0].split(" ", 1)[-1].split("+0x")[0][:80]] += 1
        counts[name] += 1
    step = sum(v for k, v in counts.items() if k != "model set-up")
    print(f"{'step':18s} {step * per_sample:8.1f} ms")
    for name, v in counts.most_common():
        print(f"{name:18s} {v * per_sample:8.1f} ms")
    for leaf, v in leaves.most_common(args.leaves):
        print(f"  {v * per_sample:7.1f} ms  {leaf}")
    for p in args.stack:
        print(f"stack has {p!r}: {found[p] * per_sample:.1f} ms")


if __name__ == "__main__":
    main()
