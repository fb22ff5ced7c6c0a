"""Speed of ifcl's training and evaluation steps against official-style references (``ifcl bench speed``).

Each case times one step of ifcl's own code (the functions the pipeline runs) and the same step written the way
the official code computes it (the references below, written for this benchmark):

- ``inflora_step``: one training step of task T+1 with T tasks learnt. ifcl merges finished branches into W_k, W_v
  (:meth:`ifcl.models.vit_lora.ViTLoRA.end_task`) and runs the last block for the CLS token only; the official
  ``Attention_LoRA`` stacks and sums Σ_s E_s R_s of every task in every forward and multiplies every token by that
  d × d matrix, with timm 0.6's explicit softmax attention; Adam over every network parameter (liangyanshuo/InfLoRA).
- ``inflora_train_e2e``: the same step with its data, end to end: the official loader (JPEG decoding and PIL
  augmentation in DataLoader workers) against ifcl's ``image_cache: all`` (decoded once, augmented on the device).
- ``inflora_collect``: InfLoRA's collection pass (C = XᵀX / n per adapted layer). Official: per-sample
  ``bmm`` summed, moved to the CPU and folded into a running mean in every block of every batch.
- ``dualgpm_update``: the memory update of every layer after a task, ifcl's torch code against the official
  NumPy float32 code path.
- ``diki_step``: one DIKI prefix-training step. The official ``CustomCLIP.forward`` also runs the frozen image
  encoder on every batch and throws the result away in training (lloongx/DIKI), and encodes the class
  prompts at the full 77-token context.
- ``diki_eval``: calibrated inference on one test batch with T tasks learnt. Official: the frozen image encoder
  on the batch, one ``MultivariateNormal`` per learnt task built (Cholesky) on every call, the full-context text
  tower, the prefixed image tower. ifcl: frozen features from the per-dataset cache, Gaussians factored once, the
  short text tower, and in both towers QuickGELU folded into the MLPs' projections and (image) the last block run
  for the class token only (:mod:`ifcl.models.clip_prefix`); the reference keeps open_clip's QuickGELU.

- ``finetune_step``, ``lwf_step``, ``zscl_step``: one AdamW step of the MTIL full fine-tuning family
  (:func:`ifcl.methods.zscl.step_loss`) on CLIP ViT-B/16, every weight trained: Continual-FT (and WiSE-FT, iCaRL's
  task 0), LwF (and LwF-VR, iCaRL: the distillation of a teacher on a second batch against 100 texts), ZSCL (the
  distillation against 1,000 reference texts plus the L2 anchor). The official loop (Thunderbeee/ZSCL
  ``mtil/src/models/finetune.py``) encodes every reference text with the frozen teacher in every step; ifcl encodes
  them once per task. The official ZSCL uses 15,840 captions (its per-step text cost is about 16 times this case's).
- ``moe_step``: one MoE-Adapters step (22 experts per block of both towers, the task's router and every expert
  trained). Timed for ifcl alone: no official-style reference is written for it.

References run in float32 without autocast (the official InfLoRA precision; DIKI's official fp16 is not used).
On CUDA ifcl's side uses bf16 autocast. Every case runs in its own process, so its peak memory (CPU: peak RSS of
the process; CUDA: peak allocated) is its own. Shapes: ``paper`` = ViT-B/16 at 224 px, rank 10, CLIP ViT-B/16 with
100 classes; ``tiny`` = small sizes for tests.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import platform
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "paper": {"image_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "rank": 10,
              "clip": "ViT-B-16", "classes": 100, "context_length": 77,
              "batch": {"cpu": {"train": 8, "eval": 16}, "cuda": {"train": 128, "eval": 256}}},
    "tiny": {"image_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "rank": 4,
             "clip": None, "classes": 5, "context_length": 16,
             "batch": {"cpu": {"train": 4, "eval": 6}, "cuda": {"train": 4, "eval": 6}}},
}


# ---------------------------------------------------------------------------------------------------------------
# official-style references
# ---------------------------------------------------------------------------------------------------------------
class OfficialStyleLoRAAttention(nn.Module):
    """InfLoRA's ``Attention_LoRA`` as the official code computes it: every task's (k, v) branch kept separately,
    Σ_{s≤t} E_s R_s stacked and summed in every forward, every token multiplied by the d × d sums, explicit softmax
    attention (timm 0.6)."""

    def __init__(self, attn: nn.Module, n_tasks: int, rank: int):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads = attn.num_heads
        d = self.qkv.in_features
        self.scale = (d // self.num_heads) ** -0.5
        self.down_k = nn.ModuleList(nn.Linear(d, rank, bias=False) for _ in range(n_tasks))
        self.up_k = nn.ModuleList(nn.Linear(rank, d, bias=False) for _ in range(n_tasks))
        self.down_v = nn.ModuleList(nn.Linear(d, rank, bias=False) for _ in range(n_tasks))
        self.up_v = nn.ModuleList(nn.Linear(rank, d, bias=False) for _ in range(n_tasks))
        self.task = n_tasks - 1
        self.moment: torch.Tensor | None = None  # the official ``cur_matrix`` (a CPU float32 attribute)
        self.count = 0

    def forward(self, x: torch.Tensor, **unused) -> torch.Tensor:  # timm 1.x blocks pass attn_mask=None etc.
        b, n, c = x.shape
        if self.moment is not None:  # get_cur_feat: per-sample products, summed, moved to the CPU
            xd = x.detach()
            batch = torch.bmm(xd.permute(0, 2, 1), xd).sum(dim=0).cpu()
            self.moment = (self.moment * self.count + batch) / (self.count + b * n)
            self.count += b * n
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        tasks = range(self.task + 1)
        wk = torch.stack([self.up_k[s].weight @ self.down_k[s].weight for s in tasks]).sum(0)
        wv = torch.stack([self.up_v[s].weight @ self.down_v[s].weight for s in tasks]).sum(0)
        k = k + (x @ wk.T).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        v = v + (x @ wv.T).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def official_style_vit(vit: nn.Module, n_tasks: int, rank: int, lora_blocks: list[int]) -> nn.Module:
    """The same frozen ViT with the official attention in the adapted blocks and per-task heads."""
    for i in lora_blocks:
        vit.blocks[i].attn = OfficialStyleLoRAAttention(vit.blocks[i].attn, n_tasks, rank)
    vit.heads = nn.ModuleList()
    return vit


def official_style_memory_update(memory: tuple | None, cov: torch.Tensor, threshold: float):
    """DualGPM's update of one layer (liangyanshuo/InfLoRA) in the official NumPy float32 code path.
    ``memory`` = (basis, kind) or None; returns the new (basis, kind) and the projector FFᵀ (``feature_mat``)."""
    import numpy as np

    act = cov.numpy().astype(np.float32)
    d = act.shape[0]
    u, s, _ = np.linalg.svd(act, full_matrices=False)
    total = (s**2).sum()
    if memory is None:
        ratio = np.cumsum(s**2) / total
        r = int((ratio < threshold).sum())
        basis, kind = u[:, : max(r, 1)], "remove" if r < d / 2 else "retain"
    else:
        basis, kind = memory
        if kind == "remove":
            hat = act - basis @ basis.T @ act
            u, s, _ = np.linalg.svd(hat, full_matrices=False)
            explained, r = (total - (s**2).sum()) / total, 0
            for e in s**2 / total:
                if explained >= threshold:
                    break
                explained += e
                r += 1
            if r:
                basis = np.hstack((basis, u[:, :r]))[:, :d]
        else:
            hat = basis @ basis.T @ act
            u, s, _ = np.linalg.svd(hat, full_matrices=False)
            unexplained, r = (s**2).sum() / total, 0
            for e in s**2 / total:
                if unexplained < 1 - threshold:
                    break
                unexplained -= e
                r += 1
            if r:
                f = basis - u[:, :r] @ u[:, :r].T @ basis
                uf, _, _ = np.linalg.svd(f)
                basis = uf[:, : basis.shape[1] - r]
    if kind == "remove" and basis.shape[1] > d / 2:
        uf, _, _ = np.linalg.svd(basis)
        basis, kind = uf[:, basis.shape[1]:], "retain"
    return (basis, kind), torch.from_numpy(basis @ basis.T)


def official_style_calibrated_logits(model, prefixes: list[dict], means: torch.Tensor, covs: torch.Tensor,
                                     images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` with ``task_ids=None`` (lloongx/DIKI): frozen features of the batch, a
    MultivariateNormal per learnt task (factored on every call), majority task, λ per image, the full-context text
    tower with the mean λ, the prefixed image tower."""
    from torch.distributions import MultivariateNormal

    frozen = F.normalize(model.clip.encode_image(images), dim=-1)
    dists = [MultivariateNormal(means[t], covs[t]) for t in range(len(prefixes))]
    log_probs = torch.vstack([dist.log_prob(frozen) for dist in dists]).t()
    top, ids = log_probs.topk(k=1, dim=1)
    lam = torch.sigmoid(top.squeeze(1) / 512 - 1.0)
    task_id, counts = torch.unique(ids, return_counts=True, sorted=True)
    u = int(task_id[counts.topk(1).indices])
    model._install("text", prefixes[u], float(lam.mean()))
    try:
        text = F.normalize(model.clip.encode_text(tokens), dim=-1)  # open_clip's own path: all 77 positions
    finally:
        model._install("text", None, 1.0)
    return model.encode_image(images, prefixes[u], lam) @ text.T


# ---------------------------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------------------------
def _vit(p: dict):
    from .models.vit_lora import build_vit

    torch.manual_seed(0)
    return build_vit(p["image_size"], p["patch_size"], p["embed_dim"], p["depth"], p["num_heads"]).eval()


def _learnt_branches(p: dict, tasks: int, gen: torch.Generator):
    """Random (R, E) for k and v of every block and task: stand-ins for learnt branches (the cost does not depend
    on their values)."""
    d, r = p["embed_dim"], p["rank"]
    return [[(torch.randn(r, d, generator=gen) / d**0.5, torch.randn(d, r, generator=gen) * 0.01,
              torch.randn(r, d, generator=gen) / d**0.5, torch.randn(d, r, generator=gen) * 0.01)
             for _ in range(p["depth"])] for _ in range(tasks)]


def inflora_models(p: dict, learnt: int, impl: str, device):
    """ifcl's ViTLoRA or the official-style ViT after ``learnt`` tasks, at the start of task learnt + 1 (its
    branch and head trainable), and its trainable parameters. Both compute the same function."""
    from .models.vit_lora import ViTLoRA

    gen = torch.Generator().manual_seed(1)
    branches = _learnt_branches(p, learnt + 1, gen)
    classes = 10
    heads = [nn.Linear(p["embed_dim"], classes) for _ in range(learnt + 1)]
    with torch.no_grad():
        for h in heads:
            h.weight.copy_(torch.randn(h.weight.shape, generator=gen) * 0.02)
            h.bias.copy_(torch.randn(h.bias.shape, generator=gen) * 0.02)
    if impl == "ifcl":
        model = ViTLoRA(_vit(p), rank=p["rank"])
        for t, per_block in enumerate(branches):
            model.begin_task([b[0] for b in per_block], [b[2] for b in per_block], classes)
            model.heads[-1].load_state_dict(heads[t].state_dict())
            with torch.no_grad():
                for layer, (_, ek, _, ev) in zip(model.lora_layers, per_block):
                    layer.up_k.copy_(ek)
                    layer.up_v.copy_(ev)
            if t < learnt:
                model.end_task()
        model.set_trainable()
        model = model.to(device)
        return model, model.trainable_parameters(), model.forward_current, model.forward
    vit = official_style_vit(_vit(p), learnt + 1, p["rank"], list(range(p["depth"])))
    with torch.no_grad():
        for t, per_block in enumerate(branches):
            for block, (rk, ek, rv, ev) in zip(vit.blocks, per_block):
                a = block.attn
                a.down_k[t].weight.copy_(rk), a.up_k[t].weight.copy_(ek)
                a.down_v[t].weight.copy_(rv), a.up_v[t].weight.copy_(ev)
    vit.heads = nn.ModuleList(heads)
    for q in vit.parameters():
        q.requires_grad_(False)
    trainable = [q for blk in vit.blocks for q in (blk.attn.up_k[learnt].weight, blk.attn.up_v[learnt].weight)]
    trainable += list(vit.heads[learnt].parameters())
    for q in trainable:
        q.requires_grad_(True)
    vit = vit.to(device)

    def features(x):
        return vit.forward_head(vit.forward_features(x), pre_logits=True)

    def current(x):
        return vit.heads[learnt](features(x))

    def every(x):
        f = features(x)
        return torch.cat([h(f) for h in vit.heads], dim=1)

    return vit, trainable, current, every


def _clip_spec(p: dict) -> dict:
    return {"type": "pretrain_clip", "image_size": p["image_size"],
            "arch": {"embed_dim": 32, "vision": {"width": p["embed_dim"], "layers": p["depth"],
                                                 "patch_size": p["patch_size"], "head_width": 16},
                     "text": {"width": 32, "heads": 2, "layers": p["depth"], "context_length": p["context_length"]}}}


def diki_model(p: dict, device, impl: str = "ifcl"):
    """CLIP (open_clip ViT-B/16 sizes, untrained, or tiny) with DIKI's prefixes in its first 8 (tiny: all) blocks,
    the same weights for either ``impl``. ifcl's folds QuickGELU into the MLPs' projections; the reference's keeps
    open_clip's QuickGELU, so that with no prefix installed it is the original CLIP computation (the official
    ``image_encoder_ori``)."""
    from .models.clip_prefix import CLIPPrefix, build_clip

    torch.manual_seed(0)
    if p["clip"]:
        import open_clip

        clip = open_clip.create_model(p["clip"], pretrained=None, force_quick_gelu=True)
        depth = 8
    else:
        clip = build_clip(_clip_spec(p))
        depth = p["depth"]
    return CLIPPrefix(clip.eval().requires_grad_(False), depth, depth, 8, fold_gelu=impl == "ifcl").to(device)


def class_tokens(p: dict, model) -> torch.Tensor:
    from .models.clip_prefix import prompts, tokenize

    names = [f"class number {i} of the benchmark" if i % 2 else f"object {i}" for i in range(p["classes"])]
    return tokenize(prompts(names, None), model.clip.context_length)


def diki_tasks(model, learnt: int, device, gen: torch.Generator):
    """``learnt`` tasks' prefixes (values non-zero, as after training) and Gaussians of the frozen features."""
    from .methods.diki import fit_gaussian

    prefixes = []
    for _ in range(learnt):
        pre = model.new_prefix(gen)
        prefixes.append({k: (v if k.endswith("key") else torch.randn(v.shape, generator=gen) * 0.1).to(device)
                         for k, v in pre.items()})
    dim = model.clip.visual.output_dim
    gaussians = []
    for t in range(learnt):  # tight clusters around different unit vectors, as normalised CLIP features
        centre = F.normalize(torch.randn(dim, generator=gen), dim=0)
        feats = F.normalize(centre + 0.05 * torch.randn(4 * dim, dim, generator=gen), dim=1)
        gaussians.append(fit_gaussian(feats))
    return prefixes, gaussians


# ---------------------------------------------------------------------------------------------------------------
# cases: one step each, returning (images in the step, step function)
# ---------------------------------------------------------------------------------------------------------------
def _autocast(device, impl: str):
    """ifcl's precision (bf16 autocast on CUDA, its default ``gpu_precision``); the references run in float32."""
    from .runtime import autocast

    return autocast(device, "bf16" if impl == "ifcl" else "fp32")


def case_inflora_step(p, device, impl, learnt, batch=None):
    """One training step on a fixed batch in memory, or on ``batch()`` (images, labels) fetched in the step."""
    model, trainable, current, _ = inflora_models(p, learnt, impl, device)
    params = trainable if impl == "ifcl" else list(model.parameters())  # official: Adam over every parameter
    opt = torch.optim.Adam(params, lr=5e-4)
    n = p["batch"][device.type]["train"]
    fixed = (torch.rand(n, 3, p["image_size"], p["image_size"], device=device), torch.randint(0, 10, (n,)))

    def step():
        x, y = batch() if batch else fixed
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, impl):
            loss = F.cross_entropy(current(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n, step


def _photo_like_images(folder, count: int, gen: torch.Generator) -> str:
    """``count`` JPEG files of 500 × 375 px (ImageNet-R-like: smooth random colour fields, which compress like
    photographs) in 10 classes, and their manifest."""
    from PIL import Image

    from .data.manifest import write_manifest

    rows = []
    for i in range(count):
        small = (torch.rand(3, 19, 25, generator=gen) * 255).to(torch.uint8)
        img = Image.fromarray(small.permute(1, 2, 0).numpy()).resize((500, 375), Image.BICUBIC)
        path = f"{folder}/img{i}.jpg"
        img.save(path, quality=90)
        rows.append((path, i % 10, f"class{i % 10}"))
    write_manifest(f"{folder}/train.csv", rows)
    return f"{folder}/train.csv"


def case_inflora_train_e2e(p, device, impl, learnt):
    """A training step with its data: the official loader (JPEG decoding, PIL RandomResizedCrop + flip, ToTensor in
    ``min(16, cores - 1)`` DataLoader workers, as the official 16) against ifcl's ``image_cache: all`` (the
    training images decoded once, at the training resolution, cropped and flipped on the device). The cache is
    written before timing (a one-off cost per dataset)."""
    import os
    import tempfile

    from .data.decoded import write_decoded
    from .data.loader import ManifestDataset, image_batches, make_loader
    from .data.transforms import make_transform

    folder = tempfile.mkdtemp(prefix="ifcl-bench-")
    n = p["batch"][device.type]["train"]
    manifest = _photo_like_images(folder, 4 * n, torch.Generator().manual_seed(5))
    size, image = p["image_size"], {"image_size": p["image_size"], "mean": [0.0] * 3, "std": [1.0] * 3}
    classes = list(range(10))
    if impl == "ifcl":
        write_decoded(manifest, "resize", size, f"{folder}/train-resize.npy", threads=os.cpu_count() or 1)
        batches = image_batches(manifest, classes, classes, "random-resized-crop-flip", image, n, shuffle=True,
                                device=device, decoded=f"{folder}/train-resize.npy")
    else:
        workers = max(1, min(16, (os.cpu_count() or 2) - 1))
        tf = make_transform("random-resized-crop-flip", size, image["mean"], image["std"])
        batches = make_loader(ManifestDataset(manifest, classes, classes, tf), n, shuffle=True, num_workers=workers,
                              pin_memory=device.type == "cuda")

    def passes():  # every pass loads its batches anew
        while True:
            yield from batches
    data = passes()
    _, step_on = case_inflora_step(p, device, impl, learnt, batch=lambda: next(data))
    return n, step_on


def case_inflora_collect(p, device, impl, learnt):
    from .steps.inflora import collect_second_moments

    model, _, _, _ = inflora_models(p, learnt, impl, device)
    n = p["batch"][device.type]["train"]
    batch = [(torch.rand(n, 3, p["image_size"], p["image_size"], device=device), None)]
    if impl == "ifcl":
        def step():
            with _autocast(device, impl):
                collect_second_moments(model, batch, device)
        return n, step
    attns = [blk.attn for blk in model.blocks]

    def step():
        with torch.no_grad():
            for a in attns:
                a.moment, a.count = torch.zeros(p["embed_dim"], p["embed_dim"]), 0
            model.forward_features(batch[0][0])
            _ = [a.moment for a in attns]
            for a in attns:
                a.moment = None
    return n, step


def case_dualgpm_update(p, device, impl, learnt):
    from .methods.inflora import update_memory

    d = p["embed_dim"]
    gen = torch.Generator().manual_seed(2)
    # second moments with a decaying spectrum, as the layers' inputs have; one per block
    covs = []
    for _ in range(p["depth"]):
        a = torch.randn(d, d, generator=gen) * torch.logspace(0, -3, d)
        covs.append(a @ a.T / d)
    first = [update_memory(None, c, 0.95) for c in covs]
    official_first = [official_style_memory_update(None, c, 0.95)[0] for c in covs]

    def step():
        if impl == "ifcl":
            for m, c in zip(first, covs):
                update_memory(m, c, 0.97).projector()
        else:
            for m, c in zip(official_first, covs):
                official_style_memory_update(m, c, 0.97)
    return p["depth"], step  # "images" = layers updated


def case_diki_step(p, device, impl, learnt):
    model = diki_model(p, device, impl)
    gen = torch.Generator().manual_seed(3)
    prefix = {k: v.to(device).requires_grad_(True) for k, v in model.new_prefix(gen).items()}
    tokens = class_tokens(p, model).to(device)
    opt = torch.optim.SGD(list(prefix.values()), lr=5.0)
    n = p["batch"][device.type]["train"]
    x = torch.rand(n, 3, p["image_size"], p["image_size"], device=device)
    y = torch.randint(0, p["classes"], (n,), device=device)
    scale = model.logit_scale().detach()

    def step():
        with _autocast(device, impl):
            if impl == "ifcl":
                text = model.encode_text(tokens, prefix)
            else:
                with torch.no_grad():  # computed and thrown away in training (lloongx/DIKI)
                    F.normalize(model.clip.encode_image(x), dim=-1)
                model._install("text", prefix, 1.0)
                try:
                    text = F.normalize(model.clip.encode_text(tokens), dim=-1)
                finally:
                    model._install("text", None, 1.0)
            loss = F.cross_entropy(scale * model.encode_image(x, prefix) @ text.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n, step


def case_diki_eval(p, device, impl, learnt):
    from .models.diki import calibrated_logits

    model = diki_model(p, device, impl)
    gen = torch.Generator().manual_seed(4)
    prefixes, gaussians = diki_tasks(model, learnt, device, gen)
    tokens = class_tokens(p, model).to(device)
    n = p["batch"][device.type]["eval"]
    x = torch.rand(n, 3, p["image_size"], p["image_size"], device=device)
    with torch.no_grad():
        frozen = F.normalize(model.clip.encode_image(x), dim=-1).float().cpu()  # the per-dataset feature cache
    means = torch.stack([g.mean for g in gaussians]).to(device)
    covs = torch.stack([g.covariance for g in gaussians]).to(device)
    cal = {"batchwise": True, "scale": 512, "weight": "likelihood"}

    def step():
        with torch.no_grad(), _autocast(device, impl):
            if impl == "ifcl":
                calibrated_logits(model, prefixes, gaussians, x, tokens, frozen, cal)
            else:
                official_style_calibrated_logits(model, prefixes, means, covs, x, tokens)
    return n, step


def _finetune_case(p, device, impl, texts: int, distill: bool, l2: bool):
    """One step of the full fine-tuning family on an untrained CLIP of the preset's sizes (float32, as the chain
    runs); ``texts`` reference texts for the teacher, re-encoded in every step by the official-style side."""
    from .methods.zscl import Recipe, step_loss

    torch.manual_seed(0)
    if p["clip"]:
        import open_clip

        clip = open_clip.create_model(p["clip"], pretrained=None, force_quick_gelu=True).to(device)
    else:
        from .models.clip_prefix import build_clip

        clip = build_clip(_clip_spec(p)).to(device)
    teacher = None
    if distill:
        import copy

        teacher = copy.deepcopy(clip).eval().requires_grad_(False)
    n = p["batch"][device.type]["train"]
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, p["image_size"], p["image_size"], generator=gen).to(device)
    ref = torch.rand(n, 3, p["image_size"], p["image_size"], generator=gen).to(device)
    y = torch.randint(0, p["classes"], (n,), generator=gen).to(device)
    tokens = torch.randint(1, 1000, (p["classes"], clip.context_length), generator=gen).to(device)
    ref_tokens = torch.randint(1, 1000, (texts, clip.context_length), generator=gen).to(device)
    params = {k: v for k, v in clip.named_parameters() if k != "logit_scale"}
    start = {k: v.detach().clone() for k, v in params.items()} if l2 else None
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    recipe = Recipe(lr=1e-5, l2=1.0 if l2 else 0.0)
    with torch.no_grad():
        teacher_texts = teacher.encode_text(ref_tokens) if distill else None

    def step():
        clip.train()
        texts_now = teacher_texts
        if distill and impl != "ifcl":  # the official loop: the teacher's reference texts again, every step
            with torch.no_grad():
                texts_now = teacher.encode_text(ref_tokens)
        loss, _ = step_loss(clip, x, y, tokens, recipe, start, (teacher, texts_now, ref) if distill else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n, step


def case_finetune_step(p, device, impl, learnt):
    return _finetune_case(p, device, impl, 0, distill=False, l2=False)


def case_lwf_step(p, device, impl, learnt):
    return _finetune_case(p, device, impl, p["classes"], distill=True, l2=False)


def case_zscl_step(p, device, impl, learnt):
    return _finetune_case(p, device, impl, 10 * p["classes"], distill=True, l2=True)


def case_moe_step(p, device, impl, learnt):
    """One MoE-Adapters training step (ifcl.methods.moe_adapters.train_task's body): the task's routers and every
    expert (22 per block of both towers at the paper's sizes, 4 in tiny) trained, the CLIP frozen, float32."""
    from .methods.moe_adapters import classification_loss
    from .models.clip_moe import CLIPMoE

    torch.manual_seed(0)
    if p["clip"]:
        import open_clip

        clip = open_clip.create_model(p["clip"], pretrained=None, force_quick_gelu=True)
        experts = 22
    else:
        from .models.clip_prefix import build_clip

        clip, experts = build_clip(_clip_spec(p)), 4
    model = CLIPMoE(clip, num_experts=experts).to(device)
    opt = torch.optim.AdamW(model.set_trainable(0), lr=1e-3)
    n = p["batch"][device.type]["train"]
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(n, 3, p["image_size"], p["image_size"], generator=gen).to(device)
    y = torch.randint(0, p["classes"], (n,), generator=gen).to(device)
    tokens = class_tokens(p, type("M", (), {"clip": clip})()).to(device)
    model.train()

    def step():
        loss = classification_loss(model.encode_image(x, 0), model.encode_text(tokens, 0), y, clip.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n, step


def state_chain_step(p, device, build, learnt, cfg=None):
    """One training step of a state-chain model (ifcl.steps.state.train's loop body) on a fixed batch, in task
    ``learnt`` - 1 of 10 classes each: ``build(vit)`` makes the model around the frozen ViT; earlier tasks are begun
    and finished as the chain does (``finish_task`` on two random images a class, or ``end_task``); the optimiser of
    ``cfg`` (``ifcl.training.make_optimizer``, default Adam 1e-3) over ``trainable_parameters()``, the model's
    ``end_step`` hook after the step, ifcl's precision."""
    from .training import make_optimizer

    model = build(_vit(p).requires_grad_(False)).to(device)
    gen = torch.Generator().manual_seed(7)
    size = p["image_size"]
    for t in range(learnt):
        model.begin_task(10, t, gen)
        if t == learnt - 1:
            break
        if hasattr(model, "finish_task"):
            images = [(torch.rand(20, 3, size, size, generator=gen).to(device), torch.arange(10).repeat(2) + 10 * t)]
            model.finish_task(images, 10 * t, images)
        elif hasattr(model, "end_task"):
            model.end_task()
    cfg = cfg or {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
    opt = make_optimizer(model.trainable_parameters(), cfg, list(model.heads[-1].parameters()))
    n = p["batch"][device.type]["train"]
    x = torch.rand(n, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    after = getattr(model, "end_step", None)

    def step():
        with _autocast(device, "ifcl"):
            out = model.forward_current(x, learnt - 1)
            logits, extra = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits, y) + (0 if extra is None else extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()
    return n, step


def _first_blocks(vit, n: int = 5) -> list[int]:
    """The official first five blocks, or every block of a shallower ViT."""
    return list(range(min(n, len(vit.blocks))))


def case_lae_step(p, device, impl, learnt):
    """One LAE training step in task ``learnt`` - 1 (from task 1 on: the offline adapters' moving average after it):
    the online adapters of blocks 0-4 and the head trained (Adam, gqk/LAE's CIFAR-100 rate)."""
    from .models.vit_lae import ViTLAE

    return state_chain_step(p, device, lambda vit: ViTLAE(vit, adapt_blocks=_first_blocks(vit)), max(learnt, 2),
                            {"optimizer": "adam", "lr": 0.0028125, "weight_decay": 0.0})


def case_clora_step(p, device, impl, learnt):
    """One C-LoRA training step in task ``learnt`` - 1: task t's rank-10 LoRA on k and v of every block and its head,
    the penalty against the earlier tasks' summed updates (Adam, the InfLoRA configs' rate)."""
    from .models.vit_clora import ViTCLoRA

    return state_chain_step(p, device, lambda vit: ViTCLoRA(vit, rank=p["rank"], weight=0.98), max(learnt, 2),
                            {"optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0})


def case_slca_step(p, device, impl, learnt):
    """One SLCA training step: every ViT parameter at 1e-4 and the new head at 1e-2 (SGD, GengDavid/SLCA)."""
    from .catalog.slca import Alignment
    from .models.vit_slca import SLCAViT

    ca = dataclasses.asdict(Alignment())
    return state_chain_step(p, device, lambda vit: SLCAViT(vit.requires_grad_(True), ca=ca), max(learnt, 2),
                            {"optimizer": "sgd", "lr": 1e-4, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4})


def case_ease_step(p, device, impl, learnt):
    """One EASE training step: task t's adapters (width 64 beside every MLP; 8 in tiny) and cosine head (SGD, the
    official ImageNet-R rate)."""
    from .models.vit_ease import ViTEASE

    width = 64 if p["embed_dim"] == 768 else 8
    return state_chain_step(p, device, lambda vit: ViTEASE(vit, bottleneck=width), max(learnt, 2),
                            {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-3})


def case_mos_step(p, device, impl, learnt):
    """One MOS training step from task 1 on: the adapter (width 16; 4 in tiny) with the official in-place merge
    pulls and the contrastive term, the whole head at a tenth of the rate (SGD, the official ImageNet-R rates)."""
    from .models.vit_mos import ViTMOS

    width = 16 if p["embed_dim"] == 768 else 4
    alignment = {"epochs": 1, "lr": 0.005, "momentum": 0.9, "weight_decay": 5e-3, "samples_per_class": 4}
    return state_chain_step(p, device, lambda vit: ViTMOS(vit, bottleneck=width, statistics_batch_size=20,
                                                          alignment=alignment), max(learnt, 2),
                            {"optimizer": "sgd", "lr": 0.05, "head_lr": 0.005, "momentum": 0.9, "weight_decay": 5e-3})


def case_hide_step(p, device, impl, learnt):
    """One HiDe-Prompt training step from task 1 on: task t's prompt (length 20 at blocks 0-4, the official ImageNet-R
    script) and head with the contrastive term against the earlier classes' centroids (Adam)."""
    from .catalog.hide_prompt import Alignment, TaskIdentity
    from .models.vit_hide_prompt import HiDePromptViT

    prompt = {"length": 20, "layers": None, "momentum": 0.01, "contrastive": 0.5, "temperature": 0.8,
              "layout": "official", "devices": 1, "device_batch": 24}
    tii = {**dataclasses.asdict(TaskIdentity()), "epochs": 1}
    align = {**dataclasses.asdict(Alignment(lr=0.005, samples=4)), "epochs": 1}

    def build(vit):
        return HiDePromptViT(vit, prompt={**prompt, "layers": _first_blocks(vit)}, tii=tii, tii_alignment=align,
                             alignment=align, centroids=2)
    return state_chain_step(p, device, build, max(learnt, 2),
                            {"optimizer": "adam", "lr": 0.0028125, "head_lr": 0.00028125, "weight_decay": 0.0})


CASES = {"inflora_step": case_inflora_step, "inflora_train_e2e": case_inflora_train_e2e,
         "inflora_collect": case_inflora_collect,
         "dualgpm_update": case_dualgpm_update, "diki_step": case_diki_step, "diki_eval": case_diki_eval,
         "finetune_step": case_finetune_step, "lwf_step": case_lwf_step, "zscl_step": case_zscl_step,
         "moe_step": case_moe_step, "lae_step": case_lae_step, "clora_step": case_clora_step,
         "slca_step": case_slca_step, "ease_step": case_ease_step, "mos_step": case_mos_step,
         "hide_step": case_hide_step}
# cases timed for ifcl alone (no official-style reference written for them)
IFCL_ONLY = {"moe_step", "lae_step", "clora_step", "slca_step", "ease_step", "mos_step", "hide_step"}


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(case: str, impl: str, learnt: int, preset: str, device: str, threads: int, warmup: int, repeats: int) -> dict:
    """Time one case in this process: ``warmup`` untimed steps, then the median of ``repeats`` timed steps."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the references
        torch.cuda.reset_peak_memory_stats()
    p = PRESETS[preset]
    items, step = CASES[case](p, dev, impl, learnt)
    for _ in range(warmup):
        step()
    _sync(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"case": case, "impl": impl, "learnt_tasks": learnt, "seconds_per_step": median,
            "items_per_step": items, "items_per_second": items / median, "peak_memory_mb": peak / 2**20,
            "times": times}


def _child(queue, args):
    try:
        queue.put(time_case(*args))
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_isolated(*args) -> dict:
    """``time_case`` in a fresh process: no CUDA state or peak memory carried over. The processes are forked from a
    server that has imported this module (and torch, timm, open_clip) once, but has started no CUDA context, so a
    case starts in a fraction of a second instead of the seconds those imports take."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"benchmark case {args[:3]} failed: {result['error']}")
    return result


# Which (case, learnt tasks) pairs are measured; the ratio is reference time / ifcl time of the same pair.
PLAN = [("inflora_step", 1), ("inflora_step", 10), ("inflora_step", 20), ("inflora_train_e2e", 10),
        ("inflora_collect", 10),
        ("dualgpm_update", 10), ("diki_step", 1), ("diki_eval", 11), ("finetune_step", 1), ("lwf_step", 1),
        ("zscl_step", 1), ("moe_step", 1), ("lae_step", 2), ("clora_step", 2),
        ("slca_step", 2), ("ease_step", 2), ("mos_step", 2), ("hide_step", 2)]


def _cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def run_benchmark(preset: str = "paper", device: str = "cpu", threads: int | None = None, warmup: int = 1,
                  repeats: int = 3, cases: list[str] | None = None, log=print) -> dict:
    threads = threads or torch.get_num_threads()
    rows, ratios = [], {}
    for case, learnt in PLAN:
        if cases and case not in cases:
            continue
        pair = {}
        for impl in ("ifcl",) if case in IFCL_ONLY else ("official-style", "ifcl"):
            r = run_isolated(case, impl, learnt, preset, device, threads, warmup, repeats)
            rows.append(r)
            pair[impl] = r
            log(f"{case:16s} T={learnt:<3d} {impl:15s} {r['seconds_per_step'] * 1000:10.1f} ms/step "
                f"{r['items_per_second']:10.1f} /s  peak {r['peak_memory_mb']:8.0f} MB")
        if "official-style" in pair:
            ratio = pair["official-style"]["seconds_per_step"] / pair["ifcl"]["seconds_per_step"]
            ratios[f"{case}@T={learnt}"] = ratio
            log(f"{case:16s} T={learnt:<3d} speed-up {ratio:.2f}x")
    growth = {impl: {r["learnt_tasks"]: r["seconds_per_step"] for r in rows
                     if r["case"] == "inflora_step" and r["impl"] == impl} for impl in ("ifcl", "official-style")}
    info = {"device": device, "preset": preset, "threads": threads, "warmup": warmup, "repeats": repeats,
            "torch": torch.__version__, "machine": platform.platform(), "processor": _cpu_name(),
            "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    return {"settings": info, "shapes": PRESETS[preset], "results": rows, "speedups": ratios,
            "inflora_step_seconds_by_learnt_tasks": growth}


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"ifcl bench speed: preset {s['preset']}, device {s['device']} ({s['cuda_device'] or s['processor']}), "
             f"{s['threads']} threads, torch {s['torch']}",
             "| case | learnt tasks | implementation | ms / step | items / s | peak memory (MB) |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['case']} | {r['learnt_tasks']} | {r['impl']} | {r['seconds_per_step'] * 1000:.1f} | "
                     f"{r['items_per_second']:.1f} | {r['peak_memory_mb']:.0f} |")
    lines.append("")
    lines.append("| case | speed-up (official-style time / ifcl time) |")
    lines.append("|---|---|")
    lines += [f"| {k} | {v:.2f}x |" for k, v in report["speedups"].items()]
    return "\n".join(lines) + "\n"



def bf16_feature_drift(configfile: str, experiment: str, seed: int = 0, root: str = ".") -> list[dict]:
    """How far a DIKI run's frozen test features would move if computed under bf16 autocast (the CPU's, which
    rounds matrix products as CUDA's does) instead of float32, and what that would do to the task choice and λ
    under the run's Gaussians after its last task. ifcl itself computes them in float32 (ifcl.runtime)."""
    from .config import load_config
    from .methods.diki import calibrate
    from .runs import load_model
    from .steps.diki import _batches

    config = load_config(configfile, root)
    spec = config["experiments"][experiment]
    model = load_model(config, experiment, seed, len(spec["sequence"]) - 1, root)
    backbone = config["backbones"][spec["backbone"]]
    rows = []
    for dataset in spec["sequence"]:
        images = torch.cat([x for x, _ in _batches(f"{root}/data/prepared/{dataset}/test.csv", backbone, 256, "cpu")])
        exact = model.frozen_features(images)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = F.normalize(model.model.encode_image(images).float(), dim=-1)
        ids, lam = calibrate(exact, model.gaussians, batchwise=False, scale=spec["calibration"]["scale"])
        ids_b, lam_b = calibrate(rounded, model.gaussians, batchwise=False, scale=spec["calibration"]["scale"])
        rows.append({"dataset": dataset, "images": len(images),
                     "max_abs_difference": float((exact - rounded).abs().max()),
                     "min_cosine": float((exact * rounded).sum(1).min()),
                     "task_choices_changed": int((ids != ids_b).sum()),
                     "max_lambda_difference": float((lam - lam_b).abs().max())})
    return rows
