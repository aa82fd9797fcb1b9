"""PyTorch reference for `omnirad bench speed`: the same ViT, the same step, the same timing.

Builds timm's VisionTransformer with the architecture of an omnirad preset (LayerScale 1e-5,
qkv bias, pre-norm, exact GELU) and times one step on random input, as omnirad does:
  infer     forward in inference mode
  finetune  classifier forward + cross-entropy (smoothing 0.1) + backward + clip 1.0 + AdamW
  pretrain  DINOv2-style: student on 2 masked global crops (+ local crops), EMA teacher on the
            globals, DINO + iBOT (shared head, 65536 prototypes) + 0.1 KoLeo, clip 3.0, AdamW,
            teacher EMA update
One JSON line per precision: fp32, tf32, bf16 autocast + SDPA (timm's fused attention), and with
--compile bf16 + torch.compile. Median ms per step after warm-up, images/s, peak memory (GPU:
max_memory_allocated; CPU: peak RSS of the process).
--grad-checkpoint recomputes every block in the backward pass (timm's set_grad_checkpointing;
omnirad's --grad-checkpoint recomputes only memory-bound ops, so their memory differs).
Usage: python bench/torch_reference.py --model vit_s16 --mode finetune --img 224 --batch 64
       [--device cpu] [--locals 8] [--compile] [--grad-checkpoint] [--profile]
"""
import argparse
import copy
import json
import resource
import sys
import time

import timm
from timm.models._manipulate import checkpoint_seq
import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {  # name: (patch, dim, depth, heads)
    "vit_pico": (4, 64, 2, 2),
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
        dynamic_img_size=True,
    )


class DinoHead(nn.Module):
    """DINOv2's DINOHead: 3-layer MLP to a bottleneck, l2-normalise, weight-normed prototypes."""

    def __init__(self, d, k, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, k, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def tokens(vit, x, mask=None):
    """Final-norm tokens; masked patch embeddings replaced by `mask_token` (iBOT)."""
    t = vit.patch_embed(x)  # [B, h, w, D] with dynamic_img_size
    if mask is not None:
        t = torch.where(mask.view(t.shape[:3])[..., None], vit.mask_token.to(t.dtype), t)
    t = vit._pos_embed(t)
    if vit.grad_checkpointing and torch.is_grad_enabled():  # as timm's forward_features
        return vit.norm(checkpoint_seq(vit.blocks, t))
    return vit.norm(vit.blocks(t))


class Ssl:
    def __init__(self, vit, k, dev):
        vit.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        self.student = nn.ModuleDict({"backbone": vit, "head": DinoHead(vit.embed_dim, k)}).to(dev)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.center = torch.zeros(k, device=dev)
        self.patch_center = torch.zeros(k, device=dev)

    def targets(self, logits, center, temp=0.07):
        return F.softmax((logits - center) / temp, dim=-1)

    def loss(self, globals_, locals_, mask):
        s, t = self.student, self.teacher
        b2 = globals_.shape[0]
        with torch.no_grad():
            tt = tokens(t["backbone"], globals_)
            t_cls = t["head"](tt[:, 0])
            t_patch = t["head"](tt[:, 1:][mask])
            p_cls = self.targets(t_cls, self.center)
            p_patch = self.targets(t_patch, self.patch_center)
            self.center = 0.9 * self.center + 0.1 * t_cls.float().mean(0)
            self.patch_center = 0.9 * self.patch_center + 0.1 * t_patch.float().mean(0)
        st = tokens(s["backbone"], globals_, mask)
        s_cls = [s["head"](st[:, 0])]
        if locals_ is not None:
            s_cls.append(s["head"](tokens(s["backbone"], locals_)[:, 0]))
        s_patch = s["head"](st[:, 1:][mask])
        # DINO: every student crop against the teacher's other global crop (same image).
        half = b2 // 2
        p_swap = torch.cat([p_cls[half:], p_cls[:half]])
        dino = -(p_swap * F.log_softmax(s_cls[0].float() / 0.1, -1)).sum(-1).mean()
        if locals_ is not None:
            loc = F.log_softmax(s_cls[1].float() / 0.1, -1).view(-1, half, p_cls.shape[-1])
            both = p_cls.view(2, half, -1)
            dino = dino + sum(-(both[g] * loc).sum(-1).mean() for g in range(2))
        ibot = -(p_patch * F.log_softmax(s_patch.float() / 0.1, -1)).sum(-1).mean()
        z = F.normalize(st[:, 0].float(), dim=-1)
        d = torch.cdist(z, z) + torch.eye(b2, device=z.device) * 1e9
        koleo = -torch.log(d.min(-1).values + 1e-8).mean()
        return dino + ibot + 0.1 * koleo

    @torch.no_grad()
    def ema(self, m=0.996):
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)


def peak_mem_mib(dev):
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def make_step(a, dev, bf16, compile_):
    vit = build(a.model, a.img).to(dev)
    vit.set_grad_checkpointing(a.grad_checkpoint)
    patch = PRESETS[a.model][0]
    x = torch.randn(a.batch, 3, a.img, a.img, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16)
    if a.mode == "infer":
        vit.eval()
        fwd = torch.compile(vit) if compile_ else vit

        def step():
            with torch.inference_mode(), amp:
                fwd(x)
        return step
    if a.mode == "finetune":
        model = nn.Sequential(vit, nn.Linear(vit.embed_dim, 10)).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
        y = torch.zeros(a.batch, dtype=torch.long, device=dev)
        fwd = torch.compile(model) if compile_ else model

        def step():
            with amp:
                loss = F.cross_entropy(fwd(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step
    ssl = Ssl(vit, a.prototypes, dev)
    opt = torch.optim.AdamW(ssl.student.parameters(), lr=1e-4, weight_decay=0.04)
    g = torch.randn(2 * a.batch, 3, a.img, a.img, device=dev)
    local = max(a.img * 96 // 224 // patch, 1) * patch
    loc = torch.randn(a.locals * a.batch, 3, local, local, device=dev) if a.locals else None
    grid = (a.img // patch) ** 2
    mask = torch.zeros(2 * a.batch, grid, dtype=torch.bool, device=dev)
    mask[::2, [j for j in range(grid) if j % 10 < 3]] = True
    loss_fn = torch.compile(ssl.loss) if compile_ else ssl.loss

    def step():
        with amp:
            loss = loss_fn(g, loc, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ssl.student.parameters(), 3.0)
        opt.step()
        ssl.ema()
    return step


def run(a, dev, name, tf32, bf16, compile_):
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = make_step(a, dev, bf16, compile_)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times, first = [], None
    for i in range(a.warmup + a.steps + (3 if compile_ else 0)):
        sync()
        t = time.perf_counter()
        step()
        sync()
        first = first or time.perf_counter() - t0
        if i >= a.warmup + (3 if compile_ else 0):
            times.append(time.perf_counter() - t)
    times.sort()
    ms = times[len(times) // 2] * 1e3
    if a.profile:  # where PyTorch's step time goes, per op, over `--steps` more steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
            sync()
        print(f"{name}: self time per op over {a.steps} steps", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    print(json.dumps({"impl": "pytorch", "precision": name, "mode": a.mode, "model": a.model, "img": a.img,
                      "batch": a.batch, "device": dev, "ms_per_step": ms, "img_per_s": a.batch / ms * 1e3,
                      "time_to_first_step_s": first, "peak_mem_mib": peak_mem_mib(dev),
                      "grad_checkpoint": a.grad_checkpoint,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}),
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_s16", choices=sorted(PRESETS))
    p.add_argument("--mode", default="infer", choices=["infer", "finetune", "pretrain"])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--locals", type=int, default=0)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precisions", default="fp32,tf32,bf16", help="subset of fp32,tf32,bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-op self times on stderr (torch.profiler)")
    a = p.parse_args()
    torch.manual_seed(0)
    modes = {"fp32": (False, False), "tf32": (True, False), "bf16": (True, True)}
    for name in filter(None, a.precisions.split(",")):  # --precisions "" --compile: compile only
        if a.device == "cpu" and name == "tf32":
            continue  # no TF32 on CPU
        tf32, bf16 = modes[name]
        run(a, a.device, name if name != "bf16" else "bf16-autocast-sdpa", tf32, bf16, False)
    if a.compile:
        run(a, a.device, "bf16+compile", True, True, True)


if __name__ == "__main__":
    main()
