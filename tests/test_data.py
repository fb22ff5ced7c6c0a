import numpy as np
import pytest
from PIL import Image

from ifcl.data.folder import folder_manifests
from ifcl.data.loader import ManifestDataset
from ifcl.data.manifest import DatasetError, class_names_of, read_manifest, write_manifest
from ifcl.data.prepare import prepare_dataset
from ifcl.data.transforms import make_transform
from ifcl.data.splits import make_tasks, write_tasks
from ifcl.files import FileCheckError, read_json, write_text


def make_tree(root, classes, n, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"img{i}.png")


def test_folder_random_split_is_seeded_stratified_and_deterministic(tmp_path):
    make_tree(tmp_path / "imgs", ["cat", "apple", "dog"], n=10)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    split = {"rule": "random", "test_fraction": 0.2, "seed": 3}
    a = folder_manifests(tmp_path / "imgs", split)
    b = folder_manifests(tmp_path / "imgs", split)
    assert a == b
    assert class_names_of(a["train"]) == ["apple", "cat", "dog"]  # sorted folder names -> labels 0..2
    for label in range(3):
        assert sum(r[1] == label for r in a["test"]) == 2 and sum(r[1] == label for r in a["train"]) == 8
    assert not {r[0] for r in a["train"]} & {r[0] for r in a["test"]}
    assert all(r[0].endswith(".png") for r in a["train"])
    c = folder_manifests(tmp_path / "imgs", {**split, "seed": 4})
    assert c["test"] != a["test"]


def test_folder_subfolders_and_errors(tmp_path):
    make_tree(tmp_path / "d" / "train", ["a", "b"], n=3)
    make_tree(tmp_path / "d" / "test", ["a", "b"], n=2)
    m = folder_manifests(tmp_path / "d", {"rule": "subfolders"})
    assert len(m["train"]) == 6 and len(m["test"]) == 4
    make_tree(tmp_path / "e" / "train", ["a", "b"], n=3)
    make_tree(tmp_path / "e" / "test", ["a"], n=2)
    with pytest.raises(DatasetError, match="same class folders"):
        folder_manifests(tmp_path / "e", {"rule": "subfolders"})
    with pytest.raises(DatasetError, match="does not exist"):
        folder_manifests(tmp_path / "nowhere", {"rule": "subfolders"})


def test_manifest_roundtrip_and_bytes(tmp_path):
    rows = [("x/a.png", 0, "a"), ("x/b.png", 1, "b, with comma")]
    write_manifest(tmp_path / "m.csv", rows)
    assert read_manifest(tmp_path / "m.csv") == rows
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "path,label,class_name"
    write_text(tmp_path / "bad.csv", "file,y\n")
    with pytest.raises(DatasetError, match="not an ifcl manifest"):
        read_manifest(tmp_path / "bad.csv")


def test_a_manifest_cut_short_or_edited_is_refused_naming_it(tmp_path):
    rows = [(f"x/{i}.png", i % 3, f"c{i % 3}") for i in range(9)]
    m = tmp_path / "test.csv"
    write_manifest(m, rows)
    assert (tmp_path / "test.csv.sha256").read_text().splitlines()[1] == "# rows: 9"
    full = m.read_bytes()
    m.write_bytes(b"".join(full.splitlines(keepends=True)[:8]))  # `head -n 8`: cut at a row boundary
    with pytest.raises(FileCheckError, match=r"test.csv has 7 data rows where its step wrote 9"):
        read_manifest(m)
    m.write_bytes(full.replace(b"x/4.png,1", b"x/4.png,2"))  # a label edited
    with pytest.raises(FileCheckError, match="test.csv was changed after its step wrote it"):
        read_manifest(m)
    m.write_bytes(full)
    assert read_manifest(m) == rows
    (tmp_path / "test.csv.sha256").unlink()
    with pytest.raises(FileCheckError, match="no recorded digest"):
        read_manifest(m)


def test_generated_dataset_manifests_are_reproducible(tmp_path):
    spec = {"type": "generated", "domain": "shapes", "classes": {"start": 0, "count": 4}, "train_per_class": 3,
            "test_per_class": 2, "image_size": 16, "seed": 0}
    for run in ("a", "b"):
        prepare_dataset(spec, tmp_path / run / "train.csv", tmp_path / run / "test.csv", str(tmp_path / "img"))
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()
    rows = read_manifest(tmp_path / "a" / "train.csv")
    assert len(rows) == 12 and len(class_names_of(rows)) == 4
    test_rows = read_manifest(tmp_path / "a" / "test.csv")
    # train and test images are different draws
    assert Image.open(rows[0][0]).tobytes() != Image.open(test_rows[0][0]).tobytes()


def test_generated_parts_span_domains_with_labels_in_listed_order(tmp_path):
    from ifcl.config import num_classes
    from ifcl.data.generated import class_slice

    spec = {"type": "generated", "parts": [{"domain": "textures", "start": 0, "count": 2},
                                           {"domain": "shapes", "start": 3, "count": 2}],
            "train_per_class": 2, "test_per_class": 1, "image_size": 16, "seed": 0}
    prepare_dataset(spec, tmp_path / "train.csv", tmp_path / "test.csv", str(tmp_path / "img"))
    names = class_names_of(read_manifest(tmp_path / "train.csv"))
    assert names == class_slice("textures", 0, 2) + class_slice("shapes", 3, 2) and num_classes(spec) == 4
    # a single-domain part draws the same pixels as the plain spec
    single = {"type": "generated", "domain": "shapes", "classes": {"start": 3, "count": 2}, "train_per_class": 2,
              "test_per_class": 1, "image_size": 16, "seed": 0}
    prepare_dataset(single, tmp_path / "s_train.csv", tmp_path / "s_test.csv", str(tmp_path / "s_img"))
    mixed_rows = [r for r in read_manifest(tmp_path / "train.csv") if r[1] >= 2]
    for (p1, _, n1), (p2, _, n2) in zip(mixed_rows, read_manifest(tmp_path / "s_train.csv")):
        assert n1 == n2 and Image.open(p1).tobytes() == Image.open(p2).tobytes()
    spec["parts"].append({"domain": "shapes", "start": 4, "count": 1})
    with pytest.raises(DatasetError, match="appear in two parts"):
        prepare_dataset(spec, tmp_path / "x.csv", tmp_path / "y.csv", str(tmp_path / "img2"))


def test_task_split_native_and_official_shuffle(tmp_path):
    t = make_tasks([f"c{i}" for i in range(6)], 3, "native", seed=0)
    assert t["tasks"] == [[0, 1], [2, 3], [4, 5]]
    # liangyanshuo/InfLoRA utils/data_manager.py: shuffle with seed 1993 gives PyCIL's CIFAR-100 order
    s = make_tasks([f"c{i}" for i in range(100)], 10, "shuffled", seed=1993)
    assert s["class_order"][:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(s["class_order"]) == list(range(100)) and len(s["tasks"]) == 10
    with pytest.raises(ValueError, match="does not divide"):
        make_tasks([f"c{i}" for i in range(10)], 3, "native", 0)
    write_manifest(tmp_path / "train.csv", [(f"p{i}", i, f"c{i}") for i in range(4)])
    write_tasks(tmp_path / "train.csv", 2, "shuffled", 5, tmp_path / "tasks.json")
    assert read_json(tmp_path / "tasks.json") == make_tasks(["c0", "c1", "c2", "c3"], 2, "shuffled", 5)


def test_loader_targets_are_positions_in_the_class_order(tmp_path):
    make_tree(tmp_path / "imgs", ["a", "b", "c"], n=2, size=10)
    rows = folder_manifests(tmp_path / "imgs", {"rule": "random", "test_fraction": 0.5, "seed": 0})["train"]
    write_manifest(tmp_path / "m.csv", rows)
    tf = make_transform("resize", 8, [0, 0, 0], [1, 1, 1])
    ds = ManifestDataset(str(tmp_path / "m.csv"), classes=[2, 0], class_order=[2, 0, 1], transform=tf)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert sorted(t for _, t in ds.items) == [0, 1]  # label 2 -> position 0, label 0 -> position 1
    with pytest.raises(DatasetError):
        ManifestDataset(str(tmp_path / "m.csv"), classes=[7], class_order=[0, 1, 2, 7], transform=tf)
