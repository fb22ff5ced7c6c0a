"""Pretrained weights as local files: fetched once on a node with internet, read from disk by every job.

``data/weights/<timm name>.safetensors`` is timm's own ``model.safetensors`` of the Hugging Face hub repository
named by the model's pretrained config (``vit_base_patch16_224.augreg_in21k`` -> ``timm/vit_base_patch16_224.
augreg_in21k``, the AugReg ImageNet-21k checkpoint of reference/inflora.md §1.1). Its sha256 is recorded beside it
(``<file>.json``) and checked whenever the fetch rule runs again.
"""
from __future__ import annotations

from pathlib import Path

from ..data.sources import FetchError, RemoteFile, download
from ..files import file_sha256, read_json, write_json

HUB = "https://huggingface.co/{repo}/resolve/main/model.safetensors"


def timm_weights_url(name: str) -> str:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise FetchError(f"timm knows no Hugging Face hub weights for {name!r}; give the backbone a local `weights` file")
    return HUB.format(repo=cfg.hf_hub_id)


def fetch_timm_weights(name: str, out: str | Path, mirror: str | None = None) -> str:
    """Download the weights of timm model ``name`` to ``out`` (verified against an earlier record if one exists);
    return their sha256."""
    out = Path(out)
    record = out.with_name(out.name + ".json")
    url = timm_weights_url(name)
    if mirror is not None:
        url = mirror.rstrip("/") + "/" + url.split("://", 1)[1]
    if not out.exists():
        try:
            download(url, out, RemoteFile(url, None, None))
        except FetchError as e:
            raise FetchError(f"{e}\nTo install the weights by hand, download {timm_weights_url(name)} on a machine "
                             f"with internet and copy it to {out}") from e
    sha256 = file_sha256(out)
    if record.exists() and read_json(record)["sha256"] != sha256:
        raise FetchError(f"{out} differs from the file recorded in {record} (sha256 {sha256}); delete both to fetch again")
    write_json(record, {"model": name, "url": url, "sha256": sha256})
    return sha256
