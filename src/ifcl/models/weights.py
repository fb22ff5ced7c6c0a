"""Pretrained weights as local files: fetched once on a node with internet, read from disk by every job.

Both kinds come from the Hugging Face hub as safetensors (so loading never unpickles):

- a ``timm`` backbone: ``data/weights/<timm name>.safetensors`` is timm's ``model.safetensors`` of the hub repository
  named by the model's pretrained config (``vit_base_patch16_224.augreg_in21k`` -> ``timm/vit_base_patch16_224.
  augreg_in21k``, the AugReg ImageNet-21k checkpoint of liangyanshuo/InfLoRA);
- an ``open_clip`` backbone: ``data/weights/<name>.<pretrained>.safetensors`` is ``open_clip_model.safetensors`` of
  the hub repository open_clip names for that tag (``ViT-B-16`` + ``openai`` -> ``timm/vit_base_patch16_clip_224.
  openai``: OpenAI's ViT-B/16 weights in open_clip's layout, the backbone of lloongx/DIKI).

The download is the one of raw sources (:func:`ifcl.data.sources.download`: through a ``.part`` file, resumed after a
cut, never renamed into place while shorter than announced), and the file must then be a whole safetensors file
(:func:`check_safetensors`: its header parses and the file ends where the header's last tensor ends) before it is
moved into place. The file's sha256 is recorded beside it (``<file>.json``) and checked, with its safetensors header,
whenever it is loaded (:func:`check_weights`) and whenever the fetch rule runs again. Weights placed by hand at that
path (the fetch rule then never runs) get their record from the check every workflow start runs
(:func:`record_placed_weights`), so they are checked on use from then on like downloaded ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import layout
from ..data.sources import FetchError, RemoteFile, download
from ..files import file_sha256, read_json, write_json

HUB = "https://huggingface.co/{repo}/resolve/main/{file}"


def weights_name(spec: dict) -> str:
    """The file stem under data/weights/ of a timm or open_clip backbone spec."""
    return spec["name"] if spec["type"] == "timm" else f"{spec['name']}.{spec['pretrained']}"


def backbone_weights_file(name: str, spec: dict) -> str:
    """Where backbone ``name``'s weights are read from: pretrained here, the user's ``weights`` file, or the file the
    fetch rule writes under data/weights/."""
    if spec["type"] in ("pretrain", "pretrain_clip"):
        return layout.pretrained_file(name, layout.BACKBONE)
    return spec.get("weights") or layout.FETCHED.format(model=weights_name(spec))


def weights_url(spec: dict) -> str:
    """The hub URL of a timm or open_clip backbone's pretrained weights."""
    if spec["type"] == "timm":
        import timm.models

        cfg = timm.models.get_pretrained_cfg(spec["name"])
        if cfg is None or not cfg.hf_hub_id:
            raise FetchError(f"timm knows no Hugging Face hub weights for {spec['name']!r}; give the backbone a local "
                             "`weights` file")
        return HUB.format(repo=cfg.hf_hub_id, file="model.safetensors")
    if spec["type"] == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec["name"], spec["pretrained"])
        if not cfg.get("hf_hub"):
            raise FetchError(f"open_clip knows no Hugging Face hub weights for {spec['name']!r} / "
                             f"{spec['pretrained']!r}; give the backbone a local `weights` file")
        return HUB.format(repo=cfg["hf_hub"].strip("/"), file="open_clip_model.safetensors")
    raise ValueError(f"backbones of type {spec['type']} have no downloadable weights")


def fetch_weights(spec: dict, out: str | Path, mirror: str | None = None) -> str:
    """Download the pretrained weights of backbone ``spec`` to ``out`` (verified against an earlier record if one
    exists); return their sha256."""
    out = Path(out)
    record = out.with_name(out.name + ".json")
    url = weights_url(spec)
    if mirror is not None:
        url = mirror.rstrip("/") + "/" + url.split("://", 1)[1]
    if not out.exists():
        try:
            download(url, out, RemoteFile(url, None, None), check=check_safetensors)
        except FetchError as e:
            raise FetchError(f"{e}\nTo install the weights by hand, download {weights_url(spec)} on a machine "
                             f"with internet and copy it to {out}") from e
    else:
        try:
            check_safetensors(out)
        except FetchError as e:
            raise FetchError(f"{e}\nDelete it (and {record}, if there) to fetch it again from {url}") from e
    sha256 = file_sha256(out)
    if record.exists() and read_json(record)["sha256"] != sha256:
        raise FetchError(f"{out} differs from the file recorded in {record} (sha256 {sha256}); delete both to fetch again")
    write_json(record, {"model": weights_name(spec), "url": url, "sha256": sha256})
    return sha256


def weights_record(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_safetensors(path: str | Path) -> None:
    """Refuse a file that is not a whole safetensors file: an 8-byte little-endian header length, a JSON header of
    that length mapping tensor names to their ``data_offsets``, and exactly the data the offsets describe (the file
    is 8 + header length + the largest offset end long). Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                raise ValueError("its header length is missing or longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise FetchError(f"{path} ({size:,} bytes) is not a safetensors file, or is cut short: {e}") from e
    if size != 8 + n + end:
        raise FetchError(f"{path} has {size:,} bytes, but its safetensors header describes {8 + n + end:,}: "
                         "the file is cut short or damaged")


def check_weights(path: str | Path) -> None:
    """Refuse weights under data/weights/ that differ from their recorded sha256, or (safetensors) are not a whole
    file (:func:`check_safetensors`). A file elsewhere, a backbone's own ``weights:`` path, has no record and is read
    as it is."""
    record = weights_record(path)
    if record.exists():
        expected = read_json(record)["sha256"]
        if file_sha256(path) != expected:
            raise FetchError(f"{path} differs from the file recorded in {record} (sha256 {expected}); restore it, "
                             "or delete both to fetch it again")
        if Path(path).suffix == ".safetensors":
            try:
                check_safetensors(path)
            except FetchError as e:
                raise FetchError(f"{e}\nDelete it and {record} to fetch it again") from e


def record_placed_weights(root: str | Path = ".") -> list[str]:
    """Record the sha256 of every weights file under data/weights/ that has no record (placed by hand); return
    their paths."""
    placed = []
    folder = Path(root) / Path(layout.FETCHED).parent
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if not weights_record(path).exists():
            write_json(weights_record(path), {"model": path.name.removesuffix(".safetensors"), "url": None,
                                              "placed_by_hand": True, "sha256": file_sha256(path)})
            placed.append(str(path.relative_to(root)))
    return placed


# ---- torchvision weights a method reads beside its backbone ----

# file stem under data/weights/ -> (the URL torchvision loads the weights from, the first hex digits of the file's
# sha256 that torchvision's file name carries and its loader checks, the prefix of the tensors kept). MoE-Adapters'
# DDAS reads AlexNet's convolutional layers (torchvision's AlexNet_Weights.IMAGENET1K_V1, the official
# `models.alexnet(pretrained=True)`).
TORCHVISION = {
    "torchvision.alexnet.imagenet1k_v1": ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79",
                                          "features."),
}


def fetch_torchvision_weights(name: str, out: str | Path, mirror: str | None = None) -> str:
    """Download torchvision's weights file ``name`` (:data:`TORCHVISION`), check its sha256 against the prefix its
    name carries, and write the tensors kept to ``out`` as safetensors (read with ``torch.load(weights_only=True)``,
    PyTorch's restricted loader, here and only here: every job reads the safetensors file). A copy of the
    ``.pth`` placed by hand beside ``out`` is used instead of a download. Returns the sha256 of ``out``, recorded
    beside it as for the backbones' weights (:func:`check_weights`)."""
    import torch
    from safetensors.torch import save

    from ..files import atomic_path

    url, digest_prefix, keep = TORCHVISION[name]
    out = Path(out)
    record = weights_record(out)
    source = url if mirror is None else mirror.rstrip("/") + "/" + url.split("://", 1)[1]
    if not out.exists():
        pth = out.with_name(url.rsplit("/", 1)[1])

        def check(path: Path) -> None:
            actual = file_sha256(path)
            if not actual.startswith(digest_prefix):
                raise FetchError(f"{path} has sha256 {actual}, not the {digest_prefix}… of torchvision's file name")

        if pth.exists():
            check(pth)
        else:
            try:
                download(source, pth, RemoteFile(source, None, None), check=check)
            except FetchError as e:
                raise FetchError(f"{e}\nTo install the weights by hand, download {url} on a machine with internet "
                                 f"and copy it to {pth}") from e
        state = torch.load(pth, map_location="cpu", weights_only=True)
        tensors = {k: v.contiguous() for k, v in state.items() if k.startswith(keep)}
        if not tensors:
            raise FetchError(f"{pth} holds no tensors named {keep}…")
        with atomic_path(out) as f:
            f.write(save(tensors, metadata={"source": url, "source_sha256": file_sha256(pth)}))
        pth.unlink()
    check_safetensors(out)
    sha256 = file_sha256(out)
    if record.exists() and read_json(record)["sha256"] != sha256:
        raise FetchError(f"{out} differs from the file recorded in {record} (sha256 {sha256}); delete both to fetch again")
    write_json(record, {"model": name, "url": url, "sha256": sha256})
    return sha256


def load_torchvision_weights(path: str | Path) -> dict:
    """The tensors of a file :func:`fetch_torchvision_weights` wrote (checked against its record)."""
    from safetensors.torch import load_file

    check_weights(path)
    return load_file(str(path))
