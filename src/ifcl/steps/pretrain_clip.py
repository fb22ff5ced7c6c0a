"""Pretraining a small open_clip CLIP inside the pipeline (the offline demo's DIKI backbone), contrastively on
captioned generated classes disjoint from the continual sequence."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..data.loader import ManifestDataset, make_loader
from ..data.manifest import class_names_of, read_manifest
from ..data.transforms import make_transform
from ..files import write_csv
from ..models.clip_prefix import build_clip, prompts, tokenize
from ..runtime import start
from ..state import save_state
from ..training import Pretrain, predict, train_classifier


def pretrain_clip(spec: dict, dataset_spec: dict, train_manifest: str, test_manifest: str, device="cpu"):
    """Contrastive image-text pretraining of a small open_clip CLIP (``spec['arch']``) on a captioned dataset.

    Each image is matched against the captions ``template.format(class name)`` of every class of the pretraining
    set (cross-entropy over the image-caption similarities, the learnt temperature included), so the text tower
    learns to compose words it will meet again in the continual datasets' unseen class names.
    Returns the CLIP, the per-epoch rows and the zero-shot test accuracy (%)."""
    p = spec["pretrain"]
    names = class_names_of(read_manifest(train_manifest))
    order = list(range(len(names)))
    size, mean, std = spec["image_size"], spec["mean"], spec["std"]
    train = ManifestDataset(train_manifest, order, order, make_transform(dataset_spec["train_transform"], size, mean, std, dataset_spec["crop_scale"]))
    test = ManifestDataset(test_manifest, order, order, make_transform("clip", size, mean, std))
    clip = build_clip(spec).to(device).train()
    tokens = tokenize(prompts(names, p["template"]), spec["arch"]["text"]["context_length"]).to(device)

    def logits(x):
        image = nn.functional.normalize(clip.encode_image(x), dim=-1)
        text = nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        return clip.logit_scale.exp().clamp(max=100) * image @ text.T

    cfg = {"optimizer": "adam", "lr": p["lr"], "weight_decay": p["weight_decay"], "epochs": p["epochs"], "schedule": "inflora-cosine"}
    rows = train_classifier(list(clip.parameters()), logits, make_loader(train, p["batch_size"], shuffle=True, seed=p["seed"]),
                            cfg, device=device, desc="pretrain clip")
    clip.eval()
    with torch.no_grad():
        preds, targets = predict(logits, make_loader(test, 256, shuffle=False), device)
    return clip.cpu(), rows, 100.0 * float((preds == targets).float().mean())


def pretrain_clip_backbone(step: Pretrain) -> None:
    """Rule pretrain_clip."""
    spec = step.spec
    device = start(step.threads, spec["pretrain"]["seed"])
    clip, rows, zero_shot = pretrain_clip(spec, step.dataset, step.train, step.test, device)
    print(f"pretraining zero-shot accuracy {zero_shot:.2f}% on the {len(class_names_of(read_manifest(step.test)))} "
          "pretraining classes")
    write_csv(step.log_csv, rows)
    save_state(step.weights, {k: v.contiguous() for k, v in clip.state_dict().items()},
               {"kind": "clip_backbone", "arch": spec["arch"], "pretrain": spec["pretrain"], "zero_shot_accuracy": zero_shot})
