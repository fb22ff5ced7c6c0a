"""Every raw source the project knows, fetched end to end from small fabricated files that have the real layout.

For each source family a fabricator builds tiny archives / lists / idx files laid out as the real downloads are
(hard-coded here from the real archives, not read from the registry), serves them at the real URLs' paths on a
local HTTP server (127.0.0.1) and places by hand what a user must place (CoOp's split files, Stanford Cars). The
registry entries are patched only in their size and checksum (same kind of checksum as the real entry). Then, in two
different working directories with the pipeline's relative paths: fetch, refetch (no new request), write the
manifests with the pipeline's function, check every row against what was fabricated, and compare the two runs'
manifests byte for byte.
"""
import dataclasses
import gzip
import hashlib
import io
import json
import random
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from ifcl.data.benchmarks import benchmark_manifests
from ifcl.data.captions import read_captions, source_captions, write_captions
from ifcl.data.manifest import read_manifest
from ifcl.data.prepare import prepare_dataset
from ifcl.data.mtil import DATASETS as MTIL_DATASETS, mtil_manifests
from ifcl.data.sources import MARKER, SOURCES, FetchError, fetch_source, read_marker
from test_sources import Server

REPO = Path(__file__).resolve().parents[1]
RAW = "data/raw"  # the pipeline's raw root (relative to its working directory)
DIGITS = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
          "8 - eight", "9 - nine"]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


# --- small files --------------------------------------------------------------------------------------------------

def picture(name: str, fmt: str = "JPEG") -> bytes:
    """A real 4x3 image whose colour depends on ``name``."""
    r, g, b = hashlib.sha256(name.encode()).digest()[:3]
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (r, g, b)).save(buf, format=fmt)
    return buf.getvalue()


def _folders(names) -> list[str]:
    return sorted({str(p) for n in names for p in PurePosixPath(n).parents if str(p) != "."})


def tar_archive(members: dict[str, bytes], gz: bool = True) -> bytes:
    """A tar (gzip-compressed unless ``gz=False``) with its folder entries, then its files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for d in _folders(members):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for d in _folders(members):
            z.writestr(d + "/", b"")
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def nth(part: str, i: int, label: int = 0) -> int:
    """A number for the i-th image of a class in a split, distinct across splits (and classes, given a label)."""
    return 100 * label + {"train": 1, "val": 41, "test": 71}[part] + i


def inside(prefix: str, images: dict[str, bytes], **others: bytes) -> dict[str, bytes]:
    """Archive members: ``images`` under ``prefix``, and ``others`` (full member names)."""
    return {**{prefix + rel: b for rel, b in images.items()}, **others}


def split_list(entries: list[tuple[str, int]]) -> bytes:
    """A CODA-Prompt split list: YAML with ``data`` (image paths) and ``targets`` (labels)."""
    return yaml.safe_dump({"data": [p for p, _ in entries], "targets": [t for _, t in entries]},
                          default_flow_style=False).encode()


def with_fabricated_checks(remote, body: bytes):
    """The registry entry with the fabricated file's size (where the real one has a size) and its checksum of the
    same kind as the real one (none where the real one has none)."""
    size = len(body) if remote.size is not None else None
    digest = None
    if remote.digest is not None:
        kind = remote.digest.split(":", 1)[0]
        assert kind in ("md5", "sha256", "gitblob"), remote.digest
        h = hashlib.sha1(b"blob %d\0" % len(body) + body) if kind == "gitblob" else hashlib.new(kind, body)
        digest = f"{kind}:{h.hexdigest()}"
    return dataclasses.replace(remote, size=size, digest=digest)


# --- what a family fabricates and expects -------------------------------------------------------------------------

Rows = list[tuple[str, int, str]]


@dataclass
class Case:
    served: dict[str, dict[str, bytes]]         # source -> remote file name -> bytes served at its real URL
    datasets: dict[str, dict]                   # dataset name -> spec (as in config/*.yaml), built in this order
    expect: dict[str, dict | Callable]          # dataset name -> exact rows per split, or check(parts, built)
    by_hand: dict[str, dict[str, bytes]] = field(default_factory=dict)  # source -> path in it -> bytes placed first
    files: dict[str, bytes] = field(default_factory=dict)  # path (from the working dir) -> bytes it must hold

    @property
    def sources(self) -> list[str]:
        return sorted(set(self.served) | set(self.by_hand))


def pixels(rows: Rows) -> Counter:
    """The decoded images of ``rows`` as (pixel bytes, label, class name), whatever their file names."""
    out = Counter()
    for path, label, name in rows:
        with Image.open(path) as im:
            out[np.asarray(im).tobytes(), label, name] += 1
    return out


def per_class(items) -> Counter:
    return Counter(label for _, label, _ in items)


def check_80_20(records: dict[str, Counter]):
    """Official test set whole; official training set split per class into 80 % train / 20 % val."""
    def check(parts, built):
        train, val, test = (pixels(parts[p]) for p in ("train", "val", "test"))
        assert test == records["test"]
        assert train + val == records["train"] and not train & val
        n = per_class(records["train"].elements())
        assert per_class(val.elements()) == {c: round(0.2 * k) for c, k in n.items()}
        assert per_class(train.elements()) == {c: k - round(0.2 * k) for c, k in n.items()}
    return check


def check_few_shot(full: str, shots: int, content=Counter):
    """``shots`` training and min(shots, 4) validation rows per class, drawn from the full dataset's; test whole."""
    def check(parts, built):
        for part, n in (("train", shots), ("val", min(shots, 4))):
            got, pool = content(parts[part]), content(built[full][part])
            assert got <= pool
            assert per_class(got.elements()) == {c: min(n, k) for c, k in per_class(pool.elements()).items()}
        assert content(parts["test"]) == content(built[full]["test"])
    return check


# --- InfLoRA benchmarks -------------------------------------------------------------------------------------------

def cifar100_case() -> Case:
    """cifar-100-binary.tar.gz: cifar-100-binary/{train,test}.bin (records: coarse label, fine label, R, G, B
    planes of 32x32) and {fine,coarse}_label_names.txt. Read by the `cifar100` benchmark and MTIL's CIFAR100."""
    names = ["apple", "aquarium_fish", "maple_tree"]
    rng = np.random.default_rng(0)
    members, records, mtil_records = {}, {}, {}
    for part, per in (("train", 5), ("test", 2)):
        fine = np.array([c for _ in range(per) for c in range(3)], np.uint8)  # classes interleaved
        coarse = (fine + 1) % 3  # differs from the fine label: reading the wrong byte shows
        planes = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        members[f"cifar-100-binary/{part}.bin"] = np.column_stack([coarse, fine, planes]).astype(np.uint8).tobytes()
        hwc = [p.reshape(3, 32, 32).transpose(1, 2, 0).tobytes() for p in planes]
        records[part] = Counter((h, int(f), names[f]) for h, f in zip(hwc, fine))
        mtil_records[part] = Counter((h, int(f), names[f].replace("_", " ")) for h, f in zip(hwc, fine))
    members["cifar-100-binary/fine_label_names.txt"] = ("\n".join(names) + "\n\n").encode()
    members["cifar-100-binary/coarse_label_names.txt"] = b"fish\nfruit_and_vegetables\ntrees\n\n"

    def check_benchmark(parts, built):
        assert pixels(parts["train"]) == records["train"] and pixels(parts["test"]) == records["test"]

    return Case(served={"cifar100": {"cifar-100-binary.tar.gz": tar_archive(members)}},
                datasets={"cifar100": {"type": "cifar100"},
                          "mtil_cifar100": {"type": "mtil", "name": "cifar100", "split_seed": 42}},
                expect={"cifar100": check_benchmark, "mtil_cifar100": check_80_20(mtil_records)})


def imagenet_r_case() -> Case:
    """imagenet-r.tar (not compressed): imagenet-r/README.txt and imagenet-r/<wnid>/<style>_<n>.jpg; CODA-Prompt's
    lists name data/imagenet-r/<wnid>/<file> with their own targets."""
    wnids = ["n01443537", "n01484850", "n12267677"]  # the real first and last wnids among them
    coda_label = {"n01443537": 2, "n01484850": 0, "n12267677": 1}  # the lists' targets, not the folder order
    rels = [f"{w}/{style}_{k}.jpg" for k, w in enumerate(wnids) for style in ("art", "cartoon", "sketch", "toy")]
    images = {rel: picture(rel) for rel in rels}
    archive = tar_archive(inside("imagenet-r/", images, **{"imagenet-r/README.txt": b"ImageNet-R\n"}), gz=False)
    lists = {part: [(f"data/imagenet-r/{r}", coda_label[r.split("/")[0]]) for r in rels
                    if ("/toy_" in r) == (part == "test")] for part in ("train", "test")}  # test: the toys
    for part in lists:
        random.Random(part).shuffle(lists[part])
    root = f"{RAW}/imagenet-r/imagenet-r"
    everything = sorted((f"{root}/{r}", wnids.index(r.split("/")[0]), r.split("/")[0]) for r in rels)

    def check_official_split(parts, built):
        import torch

        torch.manual_seed(0)  # the official code: random_split with the global generator right after seeding
        perm = torch.randperm(len(everything)).tolist()  # over the ImageFolder order: sorted wnids, sorted files
        n_train = int(0.8 * len(everything))
        assert (len(parts["train"]), len(parts["test"])) == (9, 3)
        assert parts["train"] == sorted(everything[i] for i in perm[:n_train])
        assert parts["test"] == sorted(everything[i] for i in perm[n_train:])

    return Case(
        served={"imagenet-r": {"imagenet-r.tar": archive},
                "coda-prompt-imagenet-r": {f"imagenet-r_{p}.yaml": split_list(lists[p]) for p in ("train", "test")}},
        datasets={"imagenet-r": {"type": "imagenet-r", "split": {"rule": "coda-prompt"}},
                  "imagenet-r_official-split": {"type": "imagenet-r",
                                                "split": {"rule": "random", "seed": 0, "train_fraction": 0.8}}},
        expect={"imagenet-r": {p: sorted((f"{root}/{path[len('data/imagenet-r/'):]}", label, path.split("/")[2])
                                         for path, label in lists[p]) for p in ("train", "test")},
                "imagenet-r_official-split": check_official_split},
        files={f"{root}/{r}": b for r, b in images.items()})


def domainnet_case() -> Case:
    """Six zips <domain>.zip holding <domain>/<class>/<file> (quickdraw's are PNG files); CODA-Prompt's lists name
    data/DomainNet/<domain>/<class>/<file>."""
    domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    classes = ("aircraft_carrier", "airplane")
    served, lists, files, expect = {}, {"train": [], "test": []}, {}, {"train": [], "test": []}
    for d in domains:
        members = {}
        for label, c in enumerate(classes):
            for i, part in enumerate(("train", "test")):
                ext, fmt = ("png", "PNG") if d == "quickdraw" else ("jpg", "JPEG")
                rel = f"{d}/{c}/{d}_{label + 1:03d}_{i:06d}.{ext}"
                members[rel] = files[f"{RAW}/domainnet/{rel}"] = picture(rel, fmt)
                lists[part].append((f"data/DomainNet/{rel}", label))
                expect[part].append((f"{RAW}/domainnet/{rel}", label, c))
        served[f"{d}.zip"] = zip_archive(members)
    return Case(served={"domainnet": served,
                        "coda-prompt-domainnet": {f"domainnet_{p}.yaml": split_list(lists[p]) for p in lists}},
                datasets={"domainnet": {"type": "domainnet"}},
                expect={"domainnet": {p: sorted(rows) for p, rows in expect.items()}},
                files=files)


# --- MTIL ---------------------------------------------------------------------------------------------------------

def mtil(name: str, **extra) -> dict:
    return {"type": "mtil", "name": name, "split_seed": 42, **extra}


def coop_case(name: str, split_file: str, classes: list[tuple[str, str]], rel_path: Callable, image_root: str,
              archive: Callable | None, counts=(3, 1, 2), few_shot: int = 0) -> Case:
    """A dataset read through CoOp's split file: ``classes`` = (folder key, CoOp class name); ``rel_path(key,
    label, part, i)`` = an image path as the split file writes it; ``image_root`` = where those paths are relative to
    inside data/raw/mtil-<name>/; ``archive(images)`` = {remote file name: bytes} holding the images in the real
    archive's layout (None: the images are placed by hand, as for Stanford Cars)."""
    doc, images = {}, {}
    for part, n in zip(("train", "val", "test"), counts):
        doc[part] = []
        for label, (key, cname) in enumerate(classes):
            for i in range(n):
                rel = rel_path(key, label, part, i)
                images[rel] = picture(f"{name}/{rel}")
                doc[part].append([rel, label, cname])
        random.Random(part).shuffle(doc[part])
    source, base = f"mtil-{name}", f"{RAW}/mtil-{name}/{image_root}".rstrip("/")
    by_hand = {split_file: json.dumps(doc, indent=4).encode()}
    if archive is None:
        by_hand.update(images)
    datasets, expect = {f"mtil_{name}": mtil(name)}, {}
    expect[f"mtil_{name}"] = {p: sorted((f"{base}/{rel}", label, cname) for rel, label, cname in doc[p]) for p in doc}
    if few_shot:
        datasets[f"mtil-fs_{name}"] = mtil(name, shots=few_shot)
        expect[f"mtil-fs_{name}"] = check_few_shot(f"mtil_{name}", few_shot)
    return Case(served={source: archive(images)} if archive else {}, by_hand={source: by_hand},
                datasets=datasets, expect=expect, files={f"{base}/{rel}": b for rel, b in images.items()})


def aircraft_case() -> Case:
    """fgvc-aircraft-2013b.tar.gz: fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt,
    images_variant_{train,val,test,trainval}.txt, ...} beside the top folder's scripts."""
    variants = ["707-320", "Cessna 172", "F/A-18"]  # names with a space and a slash, as in the real list
    members = {"fgvc-aircraft-2013b/README.html": b"<html></html>", "fgvc-aircraft-2013b/evaluation.m": b"% eval\n",
               "fgvc-aircraft-2013b/data/variants.txt": ("\n".join(variants) + "\n").encode(),
               "fgvc-aircraft-2013b/data/families.txt": b"Boeing 707\nCessna 172\nF/A-18\n"}
    expect, files, ids = {}, {}, iter(range(34309, 35000))
    lines = {}
    for part, n in (("train", 3), ("val", 1), ("test", 2)):
        lines[part], expect[part] = [], []
        for label, v in enumerate(variants):
            for _ in range(n):
                image = f"{next(ids):07d}"
                members[f"fgvc-aircraft-2013b/data/images/{image}.jpg"] = body = picture(image)
                files[f"{RAW}/mtil-aircraft/images/{image}.jpg"] = body
                lines[part].append(f"{image} {v}")
                expect[part].append((f"{RAW}/mtil-aircraft/images/{image}.jpg", label, v))
        members[f"fgvc-aircraft-2013b/data/images_variant_{part}.txt"] = ("\n".join(lines[part]) + "\n").encode()
    members["fgvc-aircraft-2013b/data/images_variant_trainval.txt"] = \
        ("\n".join(lines["train"] + lines["val"]) + "\n").encode()
    return Case(served={"mtil-aircraft": {"fgvc-aircraft-2013b.tar.gz": tar_archive(members)}},
                datasets={"mtil_aircraft": mtil("aircraft")},
                expect={"mtil_aircraft": {p: sorted(rows) for p, rows in expect.items()}}, files=files)


def caltech101_case() -> Case:
    """caltech-101.zip: caltech-101/{101_ObjectCategories.tar.gz, Annotations.tar, show_annotation.m}; the inner
    archive holds 101_ObjectCategories/<class>/image_<n>.jpg (CoOp renames some classes, skips the background)."""
    def archive(images):
        inner = tar_archive(inside("101_ObjectCategories/", images, **{
            "101_ObjectCategories/BACKGROUND_Google/image_0001.jpg": picture("background"),
            "101_ObjectCategories/Faces_easy/image_0001.jpg": picture("faces easy")}))
        annotations = tar_archive({"Annotations/accordion/annotation_0001.mat": b"MATLAB 5.0"}, gz=False)
        return {"caltech-101.zip": zip_archive({"caltech-101/101_ObjectCategories.tar.gz": inner,
                                                "caltech-101/Annotations.tar": annotations,
                                                "caltech-101/show_annotation.m": b"% show\n"})}
    return coop_case("caltech101", "split_zhou_Caltech101.json",
                     [("accordion", "accordion"), ("airplanes", "airplane"), ("Faces", "face")],
                     lambda key, label, part, i: f"{key}/image_{nth(part, i):04d}.jpg", "101_ObjectCategories", archive)


def dtd_case() -> Case:
    """dtd-r1.0.1.tar.gz: dtd/{images/<class>/<class>_<n>.jpg, labels/, imdb/}. Also its few-shot version."""
    return coop_case("dtd", "split_zhou_DescribableTextures.json",
                     [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided")],
                     lambda key, label, part, i: f"{key}/{key}_{nth(part, i):04d}.jpg", "images",
                     lambda images: {"dtd-r1.0.1.tar.gz": tar_archive(inside("dtd/images/", images, **{
                         "dtd/labels/train1.txt": b"banded/banded_0001.jpg\n", "dtd/imdb/imdb.mat": b"MATLAB 5.0"}))},
                     counts=(4, 3, 2), few_shot=2)


def eurosat_case() -> Case:
    """EuroSAT.zip (RGB): 2750/<Class>/<Class>_<n>.jpg; CoOp's class names are spelled out."""
    return coop_case("eurosat", "split_zhou_EuroSAT.json",
                     [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                      ("HerbaceousVegetation", "Herbaceous Vegetation Land")],
                     lambda key, label, part, i: f"{key}/{key}_{nth(part, i)}.jpg", "2750",
                     lambda images: {"EuroSAT.zip": zip_archive(inside("2750/", images))})


def flowers_case() -> Case:
    """102flowers.tgz: jpg/image_<n>.jpg, all classes in one folder."""
    return coop_case("flowers", "split_zhou_OxfordFlowers.json",
                     [("", "pink primrose"), ("", "hard-leaved pocket orchid"), ("", "colt's foot")],
                     lambda key, label, part, i: f"image_{nth(part, i, label):05d}.jpg", "jpg",
                     lambda images: {"102flowers.tgz": tar_archive(inside("jpg/", images))})


def food_case() -> Case:
    """food-101.tar.gz: food-101/{images/<class>/<id>.jpg, meta/, README.txt}."""
    return coop_case("food", "split_zhou_Food101.json",
                     [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava")],
                     lambda key, label, part, i: f"{key}/{1000000 + nth(part, i, label)}.jpg", "images",
                     lambda images: {"food-101.tar.gz": tar_archive(inside("food-101/images/", images, **{
                         "food-101/meta/classes.txt": b"apple_pie\nbaby_back_ribs\nbaklava\n",
                         "food-101/README.txt": b"Food-101\n"}))})


def oxford_pet_case() -> Case:
    """images.tar.gz: images/<Breed>_<n>.jpg, all breeds in one folder."""
    return coop_case("oxford_pet", "split_zhou_OxfordPets.json",
                     [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                      ("basset_hound", "basset_hound")],
                     lambda key, label, part, i: f"{key}_{nth(part, i)}.jpg", "images",
                     lambda images: {"images.tar.gz": tar_archive(inside("images/", images))})


def stanford_cars_case() -> Case:
    """No download: cars_train/<n>.jpg, cars_test/<n>.jpg and the split file are all placed by hand."""
    return coop_case("stanford_cars", "split_zhou_StanfordCars.json",
                     [("", "2012 Audi TTS Coupe"), ("", "2012 Ram C/V Cargo Van Minivan"),
                      ("", "AM General Hummer SUV 2000")],
                     lambda key, label, part, i: f"cars_{'test' if part == 'test' else 'train'}/"
                                                 f"{nth(part, i, label):05d}.jpg",
                     "", None)


def sun397_case() -> Case:
    """SUN397.tar.gz: SUN397/<letter>/<class>[/<sub>]/sun_<id>.jpg, ClassName.txt, README.txt."""
    return coop_case("sun397", "split_zhou_SUN397.json",
                     [("a/abbey", "abbey"), ("a/apse/indoor", "indoor apse"), ("b/badlands", "badlands")],
                     lambda key, label, part, i: f"{key}/sun_fabricated{nth(part, i, label):04d}.jpg", "SUN397",
                     lambda images: {"SUN397.tar.gz": tar_archive(inside("SUN397/", images, **{
                         "SUN397/ClassName.txt": b"/a/abbey\n/a/apse/indoor\n/b/badlands\n",
                         "SUN397/README.txt": b"SUN397\n"}))})


def mnist_case() -> Case:
    """Four gzip-compressed idx files (big-endian header: magic, count[, rows, cols]), all ten digits. Also the
    few-shot version."""
    rng = np.random.default_rng(1)
    served, records = {}, {}
    for part, prefix, per in (("train", "train", 5), ("test", "t10k", 2)):
        labels = np.array([d for _ in range(per) for d in range(10)], np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        served[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
            struct.pack(">4i", 2051, len(labels), 28, 28) + images.tobytes(), mtime=0)
        served[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
            struct.pack(">2i", 2049, len(labels)) + labels.tobytes(), mtime=0)
        records[part] = Counter((im.tobytes(), int(d), DIGITS[d]) for im, d in zip(images, labels))
    return Case(served={"mtil-mnist": served},
                datasets={"mtil_mnist": mtil("mnist"), "mtil-fs_mnist": mtil("mnist", shots=2)},
                expect={"mtil_mnist": check_80_20(records),
                        "mtil-fs_mnist": check_few_shot("mtil_mnist", 2, content=pixels)})


def imagenet_case() -> Case:
    """ZSCL's reference images: no download, train/<wnid>/<image>.JPEG and val/<wnid>/<image>.JPEG placed by hand;
    classes in wnid order, named by their wnid; no val split."""
    wnids, placed = ["n01440764", "n01443537"], {}
    for part, folder in (("train", "train"), ("test", "val")):
        for label, wnid in enumerate(wnids):
            for i in range(2 if part == "train" else 1):
                placed[f"{folder}/{wnid}/{wnid}_{i}.JPEG"] = picture(f"{folder}{wnid}{i}")
    root = f"{RAW}/mtil-imagenet"
    expect = {part: sorted((f"{root}/{rel}", wnids.index(rel.split("/")[1]), rel.split("/")[1]) for rel in placed
                           if rel.startswith(folder + "/"))
              for part, folder in (("train", "train"), ("test", "val"))}
    return Case(served={}, by_hand={"mtil-imagenet": placed}, datasets={"imagenet": mtil("imagenet")},
                expect={"imagenet": {**expect, "val": []}}, files={f"{root}/{rel}": b for rel, b in placed.items()})


def tinyimagenet_case() -> Case:
    """MoE-Adapters' reference images: tiny-imagenet-200.zip, tiny-imagenet-200/{train/<wnid>/images/<wnid>_<n>.JPEG,
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<n>.JPEG, val/val_annotations.txt, test/images/, wnids.txt,
    words.txt}; classes in wnid order, named by words.txt's first name; the official val images are the test split."""
    wnids, names = ["n01443537", "n01629819"], ["goldfish", "European fire salamander"]
    members, train, test, annotations = {}, [], [], []
    root = f"{RAW}/mtil-tinyimagenet"
    for label, wnid in enumerate(wnids):
        for i in range(2):
            rel = f"train/{wnid}/images/{wnid}_{i}.JPEG"
            members[f"tiny-imagenet-200/{rel}"] = picture(rel)
            train.append((f"{root}/{rel}", label, names[label]))
        members[f"tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt"] = b"boxes\n"
    for i, label in enumerate([1, 0, 1]):
        rel = f"val/images/val_{i}.JPEG"
        members[f"tiny-imagenet-200/{rel}"] = picture(rel)
        annotations.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t10\t10\n")
        test.append((f"{root}/{rel}", label, names[label]))
    members["tiny-imagenet-200/val/val_annotations.txt"] = "".join(annotations).encode()
    members["tiny-imagenet-200/test/images/test_0.JPEG"] = picture("test")
    members["tiny-imagenet-200/wnids.txt"] = "".join(w + "\n" for w in reversed(wnids)).encode()
    members["tiny-imagenet-200/words.txt"] = (b"n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                              b"n01629819\tEuropean fire salamander, Salamandra salamandra\n")
    return Case(served={"mtil-tinyimagenet": {"tiny-imagenet-200.zip": zip_archive(members)}},
                datasets={"tinyimagenet": mtil("tinyimagenet")},
                expect={"tinyimagenet": {"train": sorted(train), "val": [], "test": sorted(test)}},
                files={path: members["tiny-imagenet-200/" + path[len(root) + 1:]] for path, _, _ in train + test})


def conceptual_captions_case() -> Case:
    """ZSCL's reference texts: GCC-1.1.0-Validation.tsv, caption<TAB>URL per line, kept as downloaded."""
    tsv = "a dog runs on the beach\thttp://example.com/1.jpg\nan \"old\" house, at night\thttp://example.com/2.jpg\n"
    return Case(served={"conceptual-captions": {"GCC-1.1.0-Validation.tsv": tsv.encode()}},
                datasets={"conceptual_captions": {"type": "captions", "name": "conceptual_captions"}},
                expect={"conceptual_captions": ["a dog runs on the beach", 'an "old" house, at night']})


FAMILIES = {
    "cifar100": cifar100_case, "imagenet-r": imagenet_r_case, "domainnet": domainnet_case,
    "mtil-aircraft": aircraft_case, "mtil-caltech101": caltech101_case, "mtil-dtd": dtd_case,
    "mtil-eurosat": eurosat_case, "mtil-flowers": flowers_case, "mtil-food": food_case, "mtil-mnist": mnist_case,
    "mtil-oxford_pet": oxford_pet_case, "mtil-stanford_cars": stanford_cars_case, "mtil-sun397": sun397_case,
    "mtil-imagenet": imagenet_case, "mtil-tinyimagenet": tinyimagenet_case,
    "conceptual-captions": conceptual_captions_case,
}


def test_every_source_and_mtil_dataset_has_a_fabricated_layout():
    cases = [make() for make in FAMILIES.values()]
    assert sorted(s for c in cases for s in c.sources) == sorted(SOURCES)  # each source in exactly one family
    assert {spec["name"] for c in cases for spec in c.datasets.values() if spec["type"] == "mtil"} == set(MTIL_DATASETS)
    assert len(SOURCES) == 18


# --- the run ------------------------------------------------------------------------------------------------------

def patch_registry(case: Case, server: Server, monkeypatch) -> dict[str, dict[str, bytes]]:
    """Serve the fabricated files at their real URLs, give the registry their sizes and checksums; return what each
    source's marker must record (target -> bytes)."""
    recorded = {}
    for source in case.sources:
        real, served, by_hand = SOURCES[source], case.served.get(source, {}), case.by_hand.get(source, {})
        assert set(served) == {f.name for f in real.files if not f.manual}  # exactly the real downloads
        recorded[source], files = {}, []
        for remote in real.files:
            if remote.manual:
                body = by_hand[remote.dest]
            else:
                body = served[remote.name]
                server.serve(remote.url, body)
            recorded[source][remote.target] = body
            files.append(with_fabricated_checks(remote, body))
        monkeypatch.setitem(SOURCES, source, dataclasses.replace(real, files=tuple(files)))
    return recorded


def fetch(case: Case, source: str, server: Server, recorded: dict[str, bytes]) -> None:
    for rel, body in case.by_hand.get(source, {}).items():  # what the user places before fetching
        (Path(RAW) / source / rel).parent.mkdir(parents=True, exist_ok=True)
        (Path(RAW) / source / rel).write_bytes(body)
    real = {f.name: f.url for f in SOURCES[source].files}
    before = len(server.requests)
    folder = fetch_source(source, RAW, mirror=server.url)
    assert folder == Path(RAW, source)
    served = case.served.get(source, {})
    assert Counter(server.requests[before:]) == Counter("/" + real[n].split("://", 1)[1] for n in served)

    marker = read_marker(folder)
    assert marker["source"] == source and marker["placed_by_hand"] == (not served)
    if served:
        assert marker["files"] == {t: {"sha256": hashlib.sha256(b).hexdigest()} for t, b in recorded.items()}
    leftovers = [p for p in folder.rglob("*")
                 if p.name.startswith(".extract-") or p.suffix in {".part", ".gz", ".tgz", ".zip", ".tmp"}]
    assert not leftovers  # archives and compressed files unpacked, then deleted
    kept = {p.name: p.read_bytes() for p in (folder / "downloads").glob("*")}
    assert kept == {n: b for n, b in served.items() if n.endswith(".yaml")}  # the split lists are the data

    n = len(server.requests)
    assert fetch_source(source, RAW, mirror=server.url) == folder
    assert len(server.requests) == n and (folder / MARKER).is_file()


def prepare(case: Case) -> dict[str, dict[str, Rows]]:
    """Manifests as the pipeline writes them (decode_cifar100 / prepare_mtil: with images and val; list_benchmark:
    train and test only), checked against what was fabricated."""
    built = {}
    for name, spec in case.datasets.items():
        out = f"data/prepared/{name}"
        if spec["type"] == "captions":  # prepare_captions: the source's captions, in order
            write_captions(f"{out}/captions.csv", source_captions(spec, RAW))
            assert read_captions(f"{out}/captions.csv") == case.expect[name]
            continue
        decoded, has_val = spec["type"] in ("cifar100", "mtil"), spec["type"] == "mtil"
        images = f"{out}/images" if decoded else None
        prepare_dataset(spec, f"{out}/train.csv", f"{out}/test.csv", images, RAW, f"{out}/val.csv" if has_val else None)
        splits = ("train", "val", "test") if has_val else ("train", "test")
        parts = built[name] = {p: read_manifest(f"{out}/{p}.csv") for p in splits}
        direct = (mtil_manifests if has_val else benchmark_manifests)(spec, RAW, images)
        assert parts == {p: direct[p] for p in splits}

        for part, rows in parts.items():
            assert (rows or (spec["name"], part) in (("imagenet", "val"), ("tinyimagenet", "val"))
                    ) and rows == sorted(rows), (name, part)
            for path, label, cname in rows:
                assert Path(path).is_file() and not Path(path).is_absolute()
                if path in case.files:  # a fabricated raw image, listed where it was unpacked
                    assert Path(path).read_bytes() == case.files[path]
                else:  # or an image decoded from records into the dataset's images folder
                    assert images and path.startswith(images + "/"), path
        expect = case.expect[name]
        if callable(expect):
            expect(parts, built)
        else:
            assert parts == expect
    return built


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fabricated_source_fetches_into_a_correct_manifest(family, server, monkeypatch, tmp_path):
    case = FAMILIES[family]()
    recorded = patch_registry(case, server, monkeypatch)
    written = {}
    for run in ("first", "second"):  # two working directories, the pipeline's relative paths
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        for source in case.sources:
            fetch(case, source, server, recorded[source])
        prepare(case)
        written[run] = {str(p): p.read_bytes() for p in sorted(Path("data/prepared").rglob("*")) if p.is_file()}
    csvs = {p for p in written["first"] if p.endswith(".csv")}
    assert csvs == {f"data/prepared/{d}/{p}.csv" for d, s in case.datasets.items()
                    for p in {"mtil": ("train", "val", "test"), "captions": ("captions",)}.get(s["type"], ("train", "test"))}
    assert {p: written["second"].get(p) for p in csvs} == {p: written["first"][p] for p in csvs}
    assert written["second"] == written["first"]  # decoded images too


def flip_last_byte(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


@pytest.mark.parametrize("family, source, name, tamper, match", [
    ("imagenet-r", "coda-prompt-imagenet-r", "imagenet-r_train.yaml", lambda b: b + b"\n", "bytes, expected"),
    ("imagenet-r", "coda-prompt-imagenet-r", "imagenet-r_test.yaml", flip_last_byte, "sha256 check"),
    ("domainnet", "coda-prompt-domainnet", "domainnet_test.yaml", flip_last_byte, "gitblob check"),
    ("mtil-mnist", "mtil-mnist", "t10k-labels-idx1-ubyte.gz", flip_last_byte, "md5 check"),
])
def test_the_fabricated_sizes_and_checksums_are_enforced(family, source, name, tamper, match, server, monkeypatch,
                                                         tmp_path):
    """The sizes and checksums patched into the registry above are really checked: a changed file is refused."""
    case = FAMILIES[family]()
    patch_registry(case, server, monkeypatch)
    url = next(f.url for f in SOURCES[source].files if f.name == name)
    server.serve(url, tamper(case.served[source][name]))
    with pytest.raises(FetchError, match=match):
        fetch_source(source, tmp_path / "raw", mirror=server.url)
    assert not (tmp_path / "raw" / source / MARKER).exists()


def test_prepare_mtil_script_in_a_fresh_interpreter(tmp_path):
    """scripts/prepare_dataset.py run as Snakemake runs it for an MTIL dataset: in its own interpreter, with nothing
    of ifcl imported before the script (here DTD, its raw files already in place). This once failed with a circular
    import between ifcl.data.sources and ifcl.data.mtil."""
    case = dtd_case()
    placed = {f"{RAW}/mtil-dtd/{rel}": b for rel, b in case.by_hand["mtil-dtd"].items()}
    for path, body in {**placed, **case.files}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(body)
    out = "data/prepared/mtil_dtd"
    job = {"log": ["logs/prepare_mtil/mtil_dtd.log"], "params": {"spec": mtil("dtd"), "raw": RAW},
           "output": {"train": f"{out}/train.csv", "val": f"{out}/val.csv", "test": f"{out}/test.csv",
                      "images": f"{out}/images"}}
    code = ("import json, runpy, sys, types; job, ns = json.loads(sys.argv[1]), types.SimpleNamespace; "
            "runpy.run_path(sys.argv[2], init_globals={'snakemake': ns(log=job['log'], output=ns(**job['output']), "
            "params=ns(**job['params']), rule='prepare_mtil', wildcards={'dataset': 'mtil_dtd'})})")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job), str(REPO / "scripts" / "prepare_dataset.py")],
                          cwd=tmp_path, capture_output=True, text=True)
    log = tmp_path / job["log"][0]
    assert proc.returncode == 0, (log.read_text() if log.exists() else "") + proc.stderr[-3000:]
    for part in ("train", "val", "test"):
        assert read_manifest(tmp_path / out / f"{part}.csv") == case.expect["mtil_dtd"][part]
