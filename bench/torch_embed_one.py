"""PyTorch beside `omnirad embed` on one image: load a timm ViT's safetensors, embed one PNG.

Prints the seconds from the start of the script (after Python started) to the imports done, the
weights loaded into the model, and the class token computed, as one JSON line. The process's
whole wall time (interpreter start included) is what `/usr/bin/time` around it reports.
Usage: python bench/torch_embed_one.py WEIGHTS.safetensors IMAGE.png [--model vit_base_patch16_224]
"""
import argparse
import json
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

imports = time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("image")
    p.add_argument("--model", default="vit_base_patch16_224")
    a = p.parse_args()
    model = timm.create_model(a.model, pretrained=False, num_classes=0).eval()
    model.load_state_dict(load_file(a.weights))
    loaded = time.perf_counter() - t0
    # omnirad's default preprocessing: grayscale replicated to 3 channels, bicubic to 224²,
    # ImageNet mean/std.
    img = Image.open(a.image).convert("L").convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.inference_mode():
        cls = model.forward_features(((x - mean) / std)[None])[:, 0]
    done = time.perf_counter() - t0
    print(json.dumps({"imports_s": imports, "loaded_s": loaded, "embedded_s": done,
                      "dim": cls.shape[-1], "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
