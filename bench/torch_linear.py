"""PyTorch's linear layer at ViT-S/16's [B·N, D] shapes (batch 8): forward, dX, dW and autograd
forward + backward rates on the CPU in fp32, and forward and forward + backward under bf16
autocast (operand casts included, as omnirad's bf16 op includes its rounding), to set beside
`cargo bench -p omnirad-model --bench ops`.

    python bench/torch_linear.py [--threads 2]
"""
import argparse
import time

import torch


def best(f, n=7):
    f()
    times = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        times.append(time.perf_counter() - s)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = 8 * 197
    for name, k, n in [("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384)]:
        x, w, b, g = torch.randn(m, k), torch.randn(n, k), torch.zeros(n), torch.randn(m, n)
        gflop = 2 * m * k * n / 1e9
        fwd = best(lambda: torch.nn.functional.linear(x, w, b))
        dx = best(lambda: g @ w)
        dw = best(lambda: g.t() @ x)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))

        def train():
            torch.nn.functional.linear(xr, wr, br).backward(g)

        full = best(train)

        def train_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = torch.nn.functional.linear(xr, wr, br)
            y.backward(g)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            fwd16 = best(lambda: torch.nn.functional.linear(x, w, b))
        full16 = best(train_bf16)
        print(
            f"linear {name} [{m}, {k}]·[{k}, {n}]: forward {gflop / fwd:.0f}, dX {gflop / dx:.0f}, "
            f"dW {gflop / dw:.0f} GFLOP/s; forward + backward {full * 1e3:.2f} ms ({3 * gflop / full:.0f} GFLOP/s); "
            f"bf16 autocast: forward {fwd16 * 1e3:.2f} ms ({gflop / fwd16:.0f} GFLOP/s), "
            f"forward + backward {full16 * 1e3:.2f} ms ({3 * gflop / full16:.0f} GFLOP/s)"
        )


if __name__ == "__main__":
    main()
