"""Pretraining a small ViT inside the pipeline, so that the offline demo starts from a backbone that has really
learnt visual features (on generated classes disjoint from the continual sequence), as ViT-B/16 in21k does for
the papers' benchmarks."""
from __future__ import annotations

import torch.nn as nn

from ..data.loader import ManifestDataset, make_loader
from ..data.manifest import class_names_of, read_manifest
from ..data.transforms import make_transform
from ..files import write_csv
from ..models.vit_lora import build_vit
from ..runtime import start
from ..state import save_state
from ..training import Pretrain, predict, train_classifier


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
    vit = build_vit(size, a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"], a["mlp_ratio"]).to(device)
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


def pretrain_backbone(step: Pretrain) -> None:
    """Rule pretrain_backbone."""
    spec = step.spec
    device = start(step.threads, spec["pretrain"]["seed"])
    vit, rows, test_acc = pretrain_vit(spec, step.dataset, step.train, step.test, device)
    print(f"pretraining test accuracy {test_acc:.2f}% on {len(class_names_of(read_manifest(step.test)))} classes")
    write_csv(step.log_csv, rows)
    save_state(step.weights, vit.state_dict(), {"kind": "backbone", "arch": spec["arch"], "pretrain": spec["pretrain"],
                                               "pretrain_test_accuracy": test_acc})
