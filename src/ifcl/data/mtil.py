"""The eleven MTIL datasets as DIKI reads them (lloongx/DIKI), ImageNet, ZSCL's reference images
(Thunderbeee/ZSCL mtil/src/datasets/imagenet.py), and TinyImageNet, MoE-Adapters' (JiazuoYu/MoE-Adapters4CL):
raw layout, splits, class names.

Each dataset's raw folder ``data/raw/mtil-<name>/`` has the layout of the matching folder of DIKI's
``dataset_root`` (so an existing DIKI data root can be linked or copied in by hand); CIFAR100 alone is read from
the ``cifar100`` source (the binary version, which needs no unpickling). Splits:

* CoOp's ``split_zhou_*.json`` (train / val / test lists of ``[image path, label, class name]``) for Caltech101,
  DTD, EuroSAT, Flowers, Food, OxfordPet, StanfordCars and SUN397;
* Aircraft: the official ``images_variant_{train,val,test}.txt`` with the classes of ``variants.txt``;
* CIFAR100 and MNIST: the official test set, and the official training set split 80/20 per class into train / val
  with a recorded seed (DIKI redraws this split with an unseeded ``random`` in every process, the official training log:
  a deliberate, documented deviation).

* TinyImageNet, MoE-Adapters' reference images for DDAS (``JiazuoYu/MoE-Adapters4CL``
  ``mtil/src/datasets/collections.py``): tiny-imagenet-200.zip, fetched; train/<wnid>/images/ the train split, the
  official val/images/ (labelled by val/val_annotations.txt) the test split, classes in wnid order named by words.txt.
* ImageNet (placed by hand: it has no public download): ``train/<wnid>/<image>`` (ILSVRC2012's training set, extracted
  per class) is the train split, classes in sorted wnid order as torchvision's ImageFolder reads them, each named
  by its wnid; ``val/<wnid>/<image>``, where present, the test split (ZSCL's ``val_in_folder``); no val split.

Few-shot (MTIL-FS): ``shots`` training images per class and min(shots, 4) validation images per class, drawn once
with the dataset's ``split_seed``; the test set stays whole.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from .benchmarks import cifar100_manifests
from .manifest import IMAGE_SUFFIXES, DatasetError
from .remote import RemoteFile, Source

Rows = list[tuple[str, int, str]]
COOP = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#"  # links each split file (Google Drive)
VGG = "https://www.robots.ox.ac.uk/~vgg/data/"

# name: DIKI's folder name, the split reader and, for CoOp splits, the JSON file and the folder its image paths are
# relative to. Each dataset's prompt template is part of its config entry (config/mtil.yaml).
DATASETS = {
    "aircraft": dict(folder="fgvc_aircraft", reader="aircraft"),
    "caltech101": dict(folder="caltech-101", reader="coop",
                       split="split_zhou_Caltech101.json", images="101_ObjectCategories"),
    "cifar100": dict(folder="cifar100", reader="cifar100"),
    "dtd": dict(folder="dtd", reader="coop",
                split="split_zhou_DescribableTextures.json", images="images"),
    "eurosat": dict(folder="eurosat", reader="coop",
                    split="split_zhou_EuroSAT.json", images="2750"),
    "flowers": dict(folder="oxford_flowers", reader="coop",
                    split="split_zhou_OxfordFlowers.json", images="jpg"),
    "food": dict(folder="food-101", reader="coop",
                 split="split_zhou_Food101.json", images="images"),
    "mnist": dict(folder="mnist", reader="mnist"),
    "oxford_pet": dict(folder="oxford_pets", reader="coop",
                       split="split_zhou_OxfordPets.json", images="images"),
    "stanford_cars": dict(folder="stanford_cars", reader="coop",
                          split="split_zhou_StanfordCars.json", images=""),
    "sun397": dict(folder="sun397", reader="coop", split="split_zhou_SUN397.json",
                   images="SUN397"),
    "imagenet": dict(folder="imagenet", reader="imagenet"),
    "tinyimagenet": dict(folder="tinyimagenet", reader="tinyimagenet"),
}
MNIST_NAMES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
               "8 - eight", "9 - nine"]


def _coop_json(name: str) -> RemoteFile:
    """A CoOp split file: on Google Drive only, so placed by hand (no published checksum)."""
    split = DATASETS[name]["split"]
    return RemoteFile(f"{COOP}{split}", None, None, dest=split, manual=True)


def _source(name: str, files: tuple, layout: tuple, note: str) -> Source:
    return Source(f"mtil-{name}", files, layout, note)


SOURCES = {s.name: s for s in (
    _source("aircraft", (RemoteFile(VGG + "fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", None, None, extract=True,
                                    strip="fgvc-aircraft-2013b/data"),),
            ("images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"),
            "the data/ folder of fgvc-aircraft-2013b: images/, variants.txt, images_variant_{train,val,test}.txt"),
    _source("caltech101", (RemoteFile("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", None,
                                      "md5:3138e1922a9193bfa496528edbbc45d0", extract=True, strip="caltech-101",
                                      inner="101_ObjectCategories.tar.gz"), _coop_json("caltech101")),
            ("101_ObjectCategories", "split_zhou_Caltech101.json"), "101_ObjectCategories/, split_zhou_Caltech101.json"),
    _source("dtd", (RemoteFile(VGG + "dtd/download/dtd-r1.0.1.tar.gz", None, "md5:fff73e5086ae6bdbea199a49dfb8a4c1",
                               extract=True, strip="dtd"), _coop_json("dtd")),
            ("images", "split_zhou_DescribableTextures.json"), "images/, labels/, imdb/, split_zhou_DescribableTextures.json"),
    _source("eurosat", (RemoteFile("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                                   "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", None,
                                   "md5:c8fa014336c82ac7804f0398fcb19387", extract=True), _coop_json("eurosat")),
            ("2750", "split_zhou_EuroSAT.json"), "2750/<class>/<image>.jpg, split_zhou_EuroSAT.json"),
    _source("flowers", (RemoteFile(VGG + "flowers/102/102flowers.tgz", None, "md5:52808999861908f626f3c1f4e79d11fa",
                                   extract=True), _coop_json("flowers")),
            ("jpg", "split_zhou_OxfordFlowers.json"), "jpg/, split_zhou_OxfordFlowers.json (imagelabels.mat and "
            "cat_to_name.json are not needed: the split file names every class)"),
    _source("food", (RemoteFile("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", None,
                                "md5:85eeb15f3717b99a5da872d97d918f87", extract=True, strip="food-101"), _coop_json("food")),
            ("images", "split_zhou_Food101.json"), "images/<class>/<image>.jpg, split_zhou_Food101.json"),
    _source("mnist", tuple(RemoteFile(f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}", None, f"md5:{md5}", gunzip=True)
                           for f, md5 in (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                                          ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                                          ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                                          ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"))),
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
            "the four uncompressed MNIST idx files"),
    _source("oxford_pet", (RemoteFile(VGG + "pets/data/images.tar.gz", None, "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",
                                      extract=True), _coop_json("oxford_pet")),
            ("images", "split_zhou_OxfordPets.json"), "images/, split_zhou_OxfordPets.json"),
    _source("stanford_cars", (_coop_json("stanford_cars"),),
            ("cars_train", "cars_test", "split_zhou_StanfordCars.json"),
            "cars_train/, cars_test/, split_zhou_StanfordCars.json. Stanford's own download is dead (torchvision "
            "removed it, pytorch/vision#7545): get a copy by the route described there and place it here by hand"),
    _source("sun397", (RemoteFile("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", None,
                                  "md5:8ca2778205c41d23104230ba66911c7a", extract=True), _coop_json("sun397")),
            ("SUN397", "split_zhou_SUN397.json"), "SUN397/<letter>/<class>/..., split_zhou_SUN397.json"),
    _source("tinyimagenet", (RemoteFile("http://cs231n.stanford.edu/tiny-imagenet-200.zip", None, None, extract=True,
                                        strip="tiny-imagenet-200"),),
            ("train", "val/images", "val/val_annotations.txt", "words.txt"),
            "the tiny-imagenet-200/ folder of tiny-imagenet-200.zip: train/<wnid>/images/<wnid>_<n>.JPEG, "
            "val/images/val_<n>.JPEG, val/val_annotations.txt, wnids.txt, words.txt"),
    _source("imagenet", (), ("train",),
            "train/<wnid>/<image>.JPEG (ILSVRC2012_img_train.tar, https://image-net.org, with each class's tar "
            "extracted into its wnid folder) and, optionally, val/<wnid>/<image>.JPEG; ImageNet needs an account at "
            "image-net.org and has no direct download, so it is placed by hand"),
)}


def _coop_rows(raw: Path, info: dict) -> dict[str, Rows]:
    path = raw / info["split"]
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"CoOp split file {path} is missing") from None
    root = raw / info["images"] if info["images"] else raw
    return {part: [(str(root / impath), int(label), str(name)) for impath, label, name in doc[part]]
            for part in ("train", "val", "test")}


def _aircraft_rows(raw: Path) -> dict[str, Rows]:
    variants = [line.strip() for line in (raw / "variants.txt").read_text().splitlines() if line.strip()]
    index = {v: i for i, v in enumerate(variants)}
    out = {}
    for part in ("train", "val", "test"):
        rows = []
        for line in (raw / f"images_variant_{part}.txt").read_text().splitlines():
            if line.strip():
                image, variant = line.strip().split(" ", 1)
                rows.append((str(raw / "images" / f"{image}.jpg"), index[variant], variant))
        out[part] = rows
    return out


def _split_80_20(rows: Rows, seed: int) -> tuple[Rows, Rows]:
    """The official training set split per class into 80 % train and 20 % val, seeded."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for label in sorted({r[1] for r in rows}):
        items = [r for r in rows if r[1] == label]
        order = rng.permutation(len(items))
        n_val = round(0.2 * len(items))
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def _image_folder_rows(root: Path) -> Rows:
    """Every image of a class-folder tree, labels by sorted folder name, each class named by its folder."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [(str(path), label, name) for label, name in enumerate(classes)
            for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]


def _imagenet_rows(raw: Path) -> dict[str, Rows]:
    if not (raw / "train").is_dir():
        raise DatasetError(f"ImageNet's training set {raw / 'train'} is missing (train/<wnid>/<image>.JPEG)")
    test = _image_folder_rows(raw / "val") if (raw / "val").is_dir() else []
    return {"train": _image_folder_rows(raw / "train"), "val": [], "test": test}


def _tinyimagenet_rows(raw: Path) -> dict[str, Rows]:
    """TinyImageNet as MoE-Adapters' ``TinyImageNet_dataset`` reads it (`mtil/src/datasets/collections.py`): the
    training images of train/<wnid>/images/, classes in sorted wnid order; the test split is val/images/ labelled by
    val/val_annotations.txt; each class named by the first name words.txt gives its wnid; no val split."""
    if not (raw / "train").is_dir():
        raise DatasetError(f"TinyImageNet's training set {raw / 'train'} is missing (train/<wnid>/images/<image>.JPEG)")
    wnids = sorted(d.name for d in (raw / "train").iterdir() if d.is_dir())
    words = {}
    for line in (raw / "words.txt").read_text().splitlines():
        if "\t" in line:
            wnid, names = line.split("\t", 1)
            words[wnid] = names.split(",")[0].strip()
    index = {w: i for i, w in enumerate(wnids)}
    train = [(str(path), index[w], words.get(w, w)) for w in wnids
             for path in sorted((raw / "train" / w / "images").iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    test = []
    for line in (raw / "val" / "val_annotations.txt").read_text().splitlines():
        if line.strip():
            image, wnid = line.split("\t")[:2]
            test.append((str(raw / "val" / "images" / image), index[wnid], words.get(wnid, wnid)))
    return {"train": train, "val": [], "test": test}


def _idx_images(path: Path) -> np.ndarray:
    data = path.read_bytes()
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def _mnist_rows(raw: Path, images_dir: Path) -> dict[str, Rows]:
    from PIL import Image

    out = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx_images(raw / f"{prefix}-images-idx3-ubyte")
        labels = np.frombuffer((raw / f"{prefix}-labels-idx1-ubyte").read_bytes(), dtype=np.uint8, offset=8)
        rows = []
        for i, (img, label) in enumerate(zip(images, labels)):
            path = images_dir / part / f"{int(label)}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(path)
            rows.append((str(path), int(label), MNIST_NAMES[int(label)]))
        out[part] = rows
    return out


def few_shot(rows: Rows, shots: int, seed: int) -> Rows:
    """``shots`` rows per class (all if fewer), drawn with a seeded generator from the sorted rows."""
    rng = random.Random(seed)
    out = []
    for label in sorted({r[1] for r in rows}):
        items = sorted(r for r in rows if r[1] == label)
        out += items if len(items) <= shots else sorted(rng.sample(items, shots))
    return out


def mtil_manifests(spec: dict, raw_root: str | Path, images_dir: str | Path | None) -> dict[str, Rows]:
    """train / val / test rows of one MTIL dataset spec (``name``, ``split_seed``, optional ``shots``)."""
    name = spec["name"]
    info = DATASETS[name]
    raw = Path(raw_root) / f"mtil-{name}"
    if info["reader"] == "coop":
        parts = _coop_rows(raw, info)
    elif info["reader"] == "aircraft":
        parts = _aircraft_rows(raw)
    elif info["reader"] == "imagenet":
        parts = _imagenet_rows(raw)
    elif info["reader"] == "tinyimagenet":
        parts = _tinyimagenet_rows(raw)
    else:
        if info["reader"] == "cifar100":  # the InfLoRA benchmark's download (source `cifar100`)
            parts = cifar100_manifests(Path(raw_root) / "cifar100", images_dir)
            parts = {part: [(p, label, cls.replace("_", " ")) for p, label, cls in rows] for part, rows in parts.items()}
        else:
            parts = _mnist_rows(raw, Path(images_dir))
        parts["train"], parts["val"] = _split_80_20(parts["train"], spec["split_seed"])
    if spec.get("shots"):
        parts["train"] = few_shot(parts["train"], spec["shots"], spec["split_seed"])
        parts["val"] = few_shot(parts["val"], min(spec["shots"], 4), spec["split_seed"])
    return {part: sorted(rows) for part, rows in parts.items()}
