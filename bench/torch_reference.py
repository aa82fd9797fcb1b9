"""PyTorch reference for `omnirad bench embed`: the same ViT, the same batch, the same timing.

Runs timm's VisionTransformer with the architecture of an omnirad preset (LayerScale 1e-5,
qkv bias, pre-norm, exact GELU) in eval mode on random input and prints one JSON line per
precision mode: median ms per batch after warm-up, images/s, peak GPU memory.
Usage: python bench/torch_reference.py --model vit_s16 --img 224 --batch 64 [--steps 20]
"""
import argparse
import json
import time

import timm
import torch

PRESETS = {  # name: (patch, dim, depth, heads)
    "vit_tiny": (16, 192, 12, 3),
    "vit_s16": (16, 384, 12, 6),
    "vit_s14": (14, 384, 12, 6),
    "vit_b16": (16, 768, 12, 12),
    "vit_b14": (14, 768, 12, 12),
    "vit_l14": (14, 1024, 24, 16),
}


def build(name, img):
    patch, dim, depth, heads = PRESETS[name]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, num_classes=0, global_pool="token",
    )


def run(model, x, steps, warmup, autocast):
    times = []
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, torch.cuda.max_memory_allocated() / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_s16")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    model = build(a.model, a.img).cuda().eval()
    x = torch.randn(a.batch, 3, a.img, a.img, device="cuda")
    modes = [("fp32", False, False), ("tf32", True, False), ("bf16-autocast-sdpa", True, True)]
    for name, tf32, bf16 in modes:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        ms, mem = run(model, x, a.steps, a.warmup, bf16)
        print(json.dumps({"impl": "pytorch", "mode": name, "model": a.model, "img": a.img, "batch": a.batch,
                          "ms_per_batch": ms, "img_per_s": a.batch / ms * 1e3, "peak_mem_mib": mem,
                          "torch": torch.__version__, "timm": timm.__version__}))
    if a.compile:
        cmodel = torch.compile(model)
        ms, mem = run(cmodel, x, a.steps, a.warmup + 3, True)
        print(json.dumps({"impl": "pytorch", "mode": "bf16+compile", "model": a.model, "img": a.img,
                          "batch": a.batch, "ms_per_batch": ms, "img_per_s": a.batch / ms * 1e3, "peak_mem_mib": mem}))


if __name__ == "__main__":
    main()
