"""The side-by-side table of BENCHMARKS.md from the JSON lines of bench/speed.sh (or of
`omnirad bench speed` and bench/torch_reference.py run by hand): one row per (model, image
size, batch, step), ms per step as the mean over rounds with each round in parentheses, our
speed-up over PyTorch per precision (f32 against fp32, bf16 against bf16 autocast + SDPA), and
the peak memory in MiB (ours f32 / bf16; PyTorch's, the largest over its runs).
Usage: python3 bench/speed_table.py runs/speed-*.jsonl
"""
import collections
import json
import sys

# (our dtype, PyTorch's precision, its column name)
PAIRS = [("f32", "fp32", "fp32"), ("bf16", "bf16-autocast-sdpa", "bf16")]
NAMES = {"vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16", "vit_b14": "ViT-B/14", "vit_l14": "ViT-L/14"}


def main(paths):
    rows = collections.OrderedDict()
    for path in paths:
        for line in open(path):
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            torch = d.get("impl") == "pytorch"
            who = ("pytorch", d["precision"]) if torch else ("omnirad", d["dtype"])
            mib = d["peak_mem_mib"] if torch else d["peak_rss_bytes"] / 2**20
            key = (d["model"], d["img"], d["batch"], d["mode"])
            rows.setdefault(key, collections.defaultdict(list))[who].append((d["ms_per_step"], mib))
    head = ["model, batch", "step"]
    for ours, _, theirs in PAIRS:
        head += [f"ours {ours}", f"PyTorch {theirs}", ours]
    print("| " + " | ".join(head + ["memory"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for (model, img, batch, mode), runs in rows.items():
        ms = {who: [m for m, _ in v] for who, v in runs.items()}

        def mean(who):
            return sum(ms[who]) / len(ms[who]) if who in ms else None

        def cell(who):
            rounds = ", ".join(f"{m:.0f}" for m in ms.get(who, []))
            return f"{mean(who):.0f} ({rounds})" if who in ms else "—"

        def peak(impl, dtype=None):
            mibs = [b for (i, d), v in runs.items() if i == impl and dtype in (None, d) for _, b in v]
            return f"{max(mibs):.0f}" if mibs else "—"

        out = [f"{NAMES.get(model, model)} {img}², {batch}", mode]
        for ours, theirs, _ in PAIRS:
            a, b = ("omnirad", ours), ("pytorch", theirs)
            ratio = f"**{mean(b) / mean(a):.2f}×**" if a in ms and b in ms else "—"
            out += [cell(a), cell(b), ratio]
        out.append(f"{peak('omnirad', 'f32')} / {peak('omnirad', 'bf16')}; {peak('pytorch')}")
        print("| " + " | ".join(out) + " |")

if __name__ == "__main__":
    main(sys.argv[1:])
