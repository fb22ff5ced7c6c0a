import os

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


# Images are read as they are: every mode as 8-bit RGB (ifcl.data.transforms.to_rgb), by every reader.

def png16(path, pixels, colour_type):
    """A 16-bit PNG written by hand (Pillow writes none in colour): colour type 0 grey, 2 RGB, 4 grey + alpha."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = pixels.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def read_back(path, image=None, **save):
    """``image`` saved to ``path`` (if given), read through read_image: uint8 [H, W, 3]."""
    import warnings

    from ifcl.data.transforms import read_image
    if image is not None:
        image.save(path, **save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either (Pillow's about palette transparency)
        rgb = read_image(str(path))
    assert rgb.mode == "RGB"
    return np.asarray(rgb)


def grey(values):
    """The RGB array of a row of grey values."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[None, :, None], 3, axis=2)


SIXTEEN = np.array([[0, 255, 256, 1000, 32768, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = [0, 0, 1, 3, 128, 255]  # value >> 8


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_greyscale_is_scaled_not_clipped_white(tmp_path, fmt):
    image = Image.fromarray(SIXTEEN)
    assert image.mode == "I;16"
    assert np.array_equal(read_back(tmp_path / f"a.{fmt}", image), grey(SIXTEEN_AS_8))
    big_endian = Image.frombytes("I;16B", (6, 1), SIXTEEN.astype(">u2").tobytes())
    assert np.array_equal(read_back(tmp_path / "b.tiff", big_endian), grey(SIXTEEN_AS_8))
    assert Image.open(tmp_path / "b.tiff").mode == "I;16B"


def test_32_bit_integer_greyscale_is_taken_as_16_bit_data_clipped(tmp_path):
    image = Image.fromarray(np.array([[-5, 0, 1000, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert np.array_equal(read_back(tmp_path / "a.tiff", image), grey([0, 0, 3, 255, 255]))


def test_float_greyscale_is_0_to_1_unless_a_value_exceeds_1(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0, -0.5, np.nan]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.array_equal(read_back(tmp_path / "a.tiff", unit), grey([0, 64, 255, 0, 0]))
    wide = Image.fromarray(np.array([[-3.0, 1.5, 12.4, 200.6, 300.0]], dtype=np.float32))
    assert np.array_equal(read_back(tmp_path / "b.tiff", wide), grey([0, 2, 12, 201, 255]))


def test_16_bit_colour_pngs_are_read_as_their_high_byte(tmp_path):
    """Pillow opens 16-bit RGB (and grey + alpha) PNGs as 8-bit RGB (RGBA), keeping the high byte: the same
    scaling as to_rgb's for 16-bit greyscale."""
    rgb = np.array([[[0, 257, 65535], [1000, 40000, 65280]]], dtype=np.uint16)
    path = png16(tmp_path / "rgb.png", rgb, 2)
    assert Image.open(path).mode == "RGB"
    assert np.array_equal(read_back(path), (rgb >> 8).astype(np.uint8))
    grey_alpha = np.array([[[1000, 0], [65535, 30000]]], dtype=np.uint16)
    path = png16(tmp_path / "la.png", grey_alpha, 4)
    assert Image.open(path).mode == "RGBA"
    assert np.array_equal(read_back(path), grey([3, 255]))
    assert np.array_equal(read_back(png16(tmp_path / "g.png", SIXTEEN, 0)), grey(SIXTEEN_AS_8))


def palette_image(mode):
    image = Image.new(mode, (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    for x in range(3):
        image.putpixel((x, 0), x if mode == "P" else (x, 100 * x))
    return image


def test_8_bit_modes_are_converted_and_alpha_dropped_without_compositing(tmp_path):
    bits = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert np.array_equal(read_back(tmp_path / "1.png", bits), grey([0, 255]))
    assert np.array_equal(read_back(tmp_path / "l.png", Image.fromarray(np.array([[10, 200]], dtype=np.uint8))),
                          grey([10, 200]))
    la = Image.fromarray(np.array([[[10, 0], [200, 128]]], dtype=np.uint8), mode="LA")
    assert np.array_equal(read_back(tmp_path / "la.png", la), grey([10, 200]))
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], dtype=np.uint8), mode="RGBA")
    assert np.array_equal(read_back(tmp_path / "rgba.png", rgba), [[[10, 20, 30], [200, 100, 50]]])
    colours = [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    assert np.array_equal(read_back(tmp_path / "p.png", palette_image("P"), transparency=bytes([0, 128])), colours)
    assert Image.open(tmp_path / "p.png").info["transparency"] == bytes([0, 128])
    assert np.array_equal(read_back(tmp_path / "pa.tiff", palette_image("PA")), colours)


def test_cmyk_ycbcr_lab_and_hsv_are_converted(tmp_path):
    from ifcl.data.transforms import to_rgb

    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 255, 255, 0, 0, 0, 0, 128, 51, 0, 0, 0]))
    assert np.array_equal(read_back(tmp_path / "cmyk.tiff", cmyk), [[[255, 0, 0], [127, 127, 127], [204, 255, 255]]])
    ycc = np.array([[[128, 128, 128], [76, 85, 255], [150, 44, 21]]], dtype=np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JPEG's (JFIF) YCbCr
    expected = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    got = read_back(tmp_path / "ycbcr.tiff", Image.frombytes("YCbCr", (3, 1), ycc.astype(np.uint8).tobytes()))
    assert np.abs(got - np.clip(expected, 0, 255)).max() <= 1.5
    lab = Image.frombytes("LAB", (2, 1), bytes([255, 0, 0, 0, 0, 0]))  # L 100 and 0, a = b = 0: white, black
    assert np.abs(read_back(tmp_path / "lab.tiff", lab).astype(int) - grey([255, 0])).max() <= 2
    hsv = Image.frombytes("HSV", (3, 1), bytes([0, 255, 255, 85, 255, 255, 0, 0, 128]))  # no file format holds HSV
    assert np.array_equal(np.asarray(to_rgb(hsv)), [[[255, 0, 0], [0, 255, 0], [128, 128, 128]]])


def test_a_16_bit_folder_dataset_reaches_the_manifest_and_the_decoded_cache_as_it_is(tmp_path):
    from ifcl.data.decoded import write_decoded

    for c, shift in (("a", 0), ("b", 1)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((np.full((6, 6), 1000 * (i + 1) + 30000 * shift)).astype(np.uint16)).save(
                tmp_path / "imgs" / c / f"{i}.png")
    rows = folder_manifests(tmp_path / "imgs", {"rule": "random", "test_fraction": 0.5, "seed": 0})["train"]
    write_manifest(tmp_path / "m.csv", rows)
    write_decoded(str(tmp_path / "m.csv"), "resize", 6, str(tmp_path / "d.npy"))
    cache = np.load(tmp_path / "d.npy")
    for (path, *_), decoded in zip(rows, cache):
        assert np.array_equal(decoded, np.full((6, 6, 3), np.asarray(Image.open(path))[0, 0] >> 8))
    assert cache.max() < 255  # not clipped to white


# Links that do not resolve and names that are not valid UTF-8 in a user's folder.

def awkward_tree(root, kind):
    """Class folders a and b of 3 images each, and in a one file of ``kind``: its path."""
    make_tree(root, ["a", "b"], n=3, size=4)
    if kind == "dangling link":
        (root / "a" / "gone.png").symlink_to("missing.png")
        return root / "a" / "gone.png"
    if kind == "link loop":
        (root / "a" / "x.png").symlink_to("y.png")
        (root / "a" / "y.png").symlink_to("x.png")
        return root / "a" / "x.png"
    path = root / "a" / os.fsdecode(b"\xff.png")  # kind == "non-UTF-8 name"
    path.write_bytes((root / "a" / "img0.png").read_bytes())
    return path


AWKWARD = ["dangling link", "link loop", "non-UTF-8 name"]
SHOWN = {"dangling link": "a/gone.png (a link to missing.png: No such file or directory)",
         "link loop": "a/x.png (a link to y.png: Too many levels of symbolic links)",
         "non-UTF-8 name": "a/\\xff.png (its name is not valid UTF-8, which a manifest cannot hold)"}


@pytest.mark.parametrize("kind", AWKWARD)
def test_the_folder_fingerprint_returns_for_links_that_do_not_resolve_and_non_utf8_names(tmp_path, kind):
    from ifcl.data.folder import folder_fingerprint

    path = awkward_tree(tmp_path / "imgs", kind)
    before = folder_fingerprint(tmp_path / "imgs")
    assert before == folder_fingerprint(tmp_path / "imgs")
    if kind == "dangling link":  # the file the link names appears: the manifest must run again
        (tmp_path / "imgs" / "a" / "missing.png").write_bytes((tmp_path / "imgs" / "a" / "img0.png").read_bytes())
    else:
        path.unlink()
    assert folder_fingerprint(tmp_path / "imgs") != before


@pytest.mark.parametrize("kind", AWKWARD)
def test_links_that_do_not_resolve_and_non_utf8_names_are_unreadable_images(tmp_path, kind, capsys):
    awkward_tree(tmp_path / "imgs", kind)
    split = {"rule": "random", "test_fraction": 0.4, "seed": 0}
    with pytest.raises(DatasetError) as e:
        folder_manifests(tmp_path / "imgs", split)
    assert str(e.value) == (f"{tmp_path}/imgs/{SHOWN[kind].replace(' (', ' is not a readable image (', 1)}; remove, "
                            "replace or rename it, or set skip_unreadable: true on the dataset to leave such files out")
    m = folder_manifests(tmp_path / "imgs", split, skip_unreadable=True)
    assert sorted(r[0] for r in m["train"] + m["test"]) == [f"{tmp_path}/imgs/{c}/img{i}.png" for c in "ab"
                                                            for i in range(3)]
    assert f"skipped, not a readable image: {tmp_path}/imgs/{SHOWN[kind]}\n" in capsys.readouterr().out


def test_a_folder_with_a_non_utf8_name_makes_manifests_with_skip_unreadable(tmp_path, capsys):
    awkward_tree(tmp_path / "imgs", "non-UTF-8 name")
    (tmp_path / "imgs" / "b" / os.fsdecode(b"notes\xfe.txt")).write_text("not an image")
    spec = {"type": "folder", "path": str(tmp_path / "imgs"), "skip_unreadable": True,
            "split": {"rule": "random", "test_fraction": 0.4, "seed": 0}}
    prepare_dataset(spec, str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))
    assert len(read_manifest(tmp_path / "train.csv")) + len(read_manifest(tmp_path / "test.csv")) == 6
    assert f"not images, left out: 1 files ({tmp_path}/imgs/b/notes\\xfe.txt)" in capsys.readouterr().out


def test_a_class_folder_whose_name_is_not_utf8_is_named(tmp_path):
    make_tree(tmp_path / "imgs", ["a", os.fsdecode(b"b\xff")], n=2, size=4)
    with pytest.raises(DatasetError, match=r"class folder .*/imgs/b\\xff: its name is not valid UTF-8.*rename it"):
        folder_manifests(tmp_path / "imgs", {"rule": "random", "test_fraction": 0.5, "seed": 0})
