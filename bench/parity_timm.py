"""Parity check: omnirad's ViT against timm's VisionTransformer on the same weights and images.

Builds a timm ViT with an omnirad preset's architecture, gives it random weights (LayerScale
gammas drawn around 0.3 so every block matters), writes them as an omnirad model directory
(config.json + model.safetensors, timm key names), writes 224x224 grey PNGs (so omnirad's resize
is the identity) and timm's class tokens for them. `compare` then checks omnirad's embeddings.

  python bench/parity_timm.py make --model vit_s16 --dir DIR
  omnirad embed --model DIR/model --input DIR/images --out DIR/omnirad_cuda.npy --device cuda
  python bench/parity_timm.py compare --dir DIR DIR/omnirad_cuda.npy
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from torch_reference import PRESETS, build  # noqa: E402


def make(a):
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build(a.model, 224).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.3 + 0.1 * torch.randn_like(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    patch, dim, depth, heads = PRESETS[a.model]
    mdir = os.path.join(a.dir, "model")
    idir = os.path.join(a.dir, "images")
    os.makedirs(mdir, exist_ok=True)
    os.makedirs(idir, exist_ok=True)
    cfg = {
        "architecture": "vit",
        "vit": {"img_size": 224, "patch_size": patch, "in_chans": 3, "embed_dim": dim, "depth": depth,
                "num_heads": heads, "mlp_ratio": 4.0, "qkv_bias": True, "layer_scale_init": 1e-5,
                "num_registers": 0, "drop_path_rate": 0.0, "drop_path_uniform": False, "norm_eps": 1e-6},
        "preprocess": {"size": 224, "resize": "stretch", "channels": 3, "normalize": {"kind": "imagenet"}},
    }
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, dim)  # omnirad keeps DINOv2's mask token; timm has none
    save_file(sd, os.path.join(mdir, "model.safetensors"))

    from PIL import Image
    rng = np.random.default_rng(a.seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    imgs = []
    for i in range(a.n):
        f1, f2, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3)
        v = 0.5 + 0.35 * np.sin(f1 * 6.28 * xx + ph) * np.cos(f2 * 6.28 * yy) + 0.1 * rng.standard_normal((224, 224))
        u8 = np.clip(np.round(v * 255), 0, 255).astype(np.uint8)
        Image.fromarray(u8, mode="L").save(os.path.join(idir, f"img_{i:02d}.png"))
        imgs.append(u8.astype(np.float32) / 255.0)
    x = torch.from_numpy(np.stack(imgs))[:, None].repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.forward_features((x - mean) / std)[:, 0].numpy()
    np.save(os.path.join(a.dir, "timm_cls.npy"), ref.astype(np.float32))
    print(json.dumps({"made": a.model, "images": a.n, "ref_std": float(ref.std())}))


def compare(a):
    ref = np.load(os.path.join(a.dir, "timm_cls.npy")).astype(np.float64)
    for path in a.ours:
        ours = np.load(path).astype(np.float64)
        err = np.abs(ours - ref)
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        print(json.dumps({"file": os.path.basename(path), "max_abs_err": float(err.max()),
                          "rel_l2_err": float(rel), "ref_max_abs": float(np.abs(ref).max())}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", default="vit_s16")
    m.add_argument("--dir", required=True)
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare")
    c.add_argument("--dir", required=True)
    c.add_argument("ours", nargs="+")
    a = p.parse_args()
    make(a) if a.cmd == "make" else compare(a)
