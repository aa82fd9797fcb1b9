"""Full-size parity check against transformers: a random-init DINOv2 ViT-B/14 at 518 px
(RAD-DINO's shape) saved with save_pretrained, 518² grey PNGs (so omnirad's resize is the
identity), and transformers' pooler output (final-norm class token) for them.

  python bench/parity_hf.py make --dir D [--device cuda]
  omnirad embed --model D/model --input D/images --out D/ours.npy --device cuda
  python bench/parity_timm.py compare --dir D D/ours.npy     (reads D/timm_cls.npy)
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

p = argparse.ArgumentParser()
p.add_argument("cmd", choices=["make"])
p.add_argument("--dir", required=True)
p.add_argument("--n", type=int, default=4)
p.add_argument("--device", default="cpu")
a = p.parse_args()
torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=14, image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0)
model = Dinov2Model(cfg).eval()
with torch.no_grad():
    for name, prm in model.named_parameters():
        if name.endswith("lambda1"):
            prm.copy_(0.3 + 0.1 * torch.randn_like(prm))
model.save_pretrained(os.path.join(a.dir, "model"), safe_serialization=True)
os.makedirs(os.path.join(a.dir, "images"), exist_ok=True)
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:518, 0:518] / 518.0
imgs = []
for i in range(a.n):
    v = 0.5 + 0.35 * np.sin(rng.uniform(1, 6) * 6.28 * xx) * np.cos(rng.uniform(1, 6) * 6.28 * yy) + 0.1 * rng.standard_normal((518, 518))
    u8 = np.clip(np.round(v * 255), 0, 255).astype(np.uint8)
    Image.fromarray(u8, mode="L").save(os.path.join(a.dir, "images", f"img_{i:02d}.png"))
    imgs.append(u8.astype(np.float32) / 255.0)
x = torch.from_numpy(np.stack(imgs))[:, None].repeat(1, 3, 1, 1)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
model = model.to(a.device)
with torch.no_grad():
    ref = model(pixel_values=((x - mean) / std).to(a.device)).pooler_output.float().cpu().numpy()
np.save(os.path.join(a.dir, "timm_cls.npy"), ref)
print("reference class tokens", ref.shape, "std", float(ref.std()))
