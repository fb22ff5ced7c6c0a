"""Pretraining a small ViT inside the pipeline, so that the offline demo starts from a backbone that has really
learnt visual features (on generated classes disjoint from the continual sequence), as ViT-B/16 in21k does for
the papers' benchmarks."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import chain
from .data.loader import ManifestDataset, make_loader, make_transform
from .data.manifest import class_names_of, read_manifest
from .files import write_csv
from .models.vit_lora import build_vit
from .state import save_state
from .training import predict, train_classifier


def pretrain_vit(spec: dict, dataset_spec: dict, train_manifest: str, test_manifest: str, device="cpu"):
    """Supervised pretraining of ``spec['arch']`` with a linear head on every class of the pretraining dataset.

    Adam with the given lr and weight decay, the InfLoRA cosine schedule, the dataset's transforms.
    Returns the ViT (no head), the per-epoch log rows and the held-out test accuracy (%).
    """
    a, p = spec["arch"], spec["pretrain"]
    n_classes = len(class_names_of(read_manifest(train_manifest)))
    order = list(range(n_classes))
    size, mean, std = spec["image_size"], spec["mean"], spec["std"]
    train = ManifestDataset(train_manifest, order, order, make_transform(dataset_spec["train_transform"], size, mean, std, dataset_spec["crop_scale"]))
    test = ManifestDataset(test_manifest, order, order, make_transform(dataset_spec["test_transform"], size, mean, std))
    vit = build_vit(size, a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"], a.get("mlp_ratio", 4.0)).to(device)
    head = nn.Linear(vit.embed_dim, n_classes).to(device)

    def logits(x):
        return head(vit.forward_head(vit.forward_features(x), pre_logits=True))

    vit.train()
    cfg = {"optimizer": "adam", "lr": p["lr"], "weight_decay": p["weight_decay"], "epochs": p["epochs"], "schedule": "inflora-cosine"}
    rows = train_classifier(list(vit.parameters()) + list(head.parameters()), logits,
                            make_loader(train, p["batch_size"], shuffle=True, seed=p["seed"]), cfg, device=device, desc="pretrain")
    vit.eval()
    preds, targets = predict(logits, make_loader(test, 256, shuffle=False), device)
    test_acc = 100.0 * float((preds == targets).float().mean())
    return vit.cpu(), rows, test_acc


def pretrain_backbone(spec: dict, dataset_spec: dict, train_csv: str, test_csv: str, weights_out: str, log_out: str, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    chain.seed_everything(spec["pretrain"]["seed"])
    vit, rows, test_acc = pretrain_vit(spec, dataset_spec, train_csv, test_csv, chain.pick_device())
    print(f"pretraining test accuracy {test_acc:.2f}% on {len(class_names_of(read_manifest(test_csv)))} classes")
    write_csv(log_out, rows)
    save_state(weights_out, vit.state_dict(), {"kind": "backbone", "arch": spec["arch"], "pretrain": spec["pretrain"],
                                               "pretrain_test_accuracy": test_acc})


def pretrain_clip(spec: dict, dataset_spec: dict, train_manifest: str, test_manifest: str, device="cpu"):
    """Contrastive image-text pretraining of a small open_clip CLIP (``spec['arch']``) on a captioned dataset.

    Each image is matched against the captions ``template.format(class name)`` of every class of the pretraining
    set (cross-entropy over the image-caption similarities, the learnt temperature included), so the text tower
    learns to compose words it will meet again in the continual datasets' unseen class names.
    Returns the CLIP, the per-epoch rows and the zero-shot test accuracy (%)."""
    from .models.clip_prefix import build_clip, prompts, tokenize

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


def pretrain_clip_backbone(spec: dict, dataset_spec: dict, train_csv: str, test_csv: str, weights_out: str, log_out: str,
                           threads: int = 1) -> None:
    torch.set_num_threads(threads)
    chain.seed_everything(spec["pretrain"]["seed"])
    clip, rows, zero_shot = pretrain_clip(spec, dataset_spec, train_csv, test_csv, chain.pick_device())
    print(f"pretraining zero-shot accuracy {zero_shot:.2f}% on the {len(class_names_of(read_manifest(test_csv)))} pretraining classes")
    write_csv(log_out, rows)
    save_state(weights_out, {k: v.contiguous() for k, v in clip.state_dict().items()},
               {"kind": "clip_backbone", "arch": spec["arch"], "pretrain": spec["pretrain"], "zero_shot_accuracy": zero_shot})
