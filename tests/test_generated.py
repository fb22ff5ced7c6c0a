"""Tests for the deterministic procedural dataset generator (ifcl.data.generated)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from ifcl.data import generated as gen
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from ifcl.data import generated as gen


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize("domain", gen.DOMAINS)
def test_write_split_is_byte_deterministic(tmp_path: Path, domain: str) -> None:
    classes = gen.class_slice(domain, 0, 3)
    rows_a = gen.write_split(tmp_path / "a", domain, classes, 4, 32, seed=7)
    rows_b = gen.write_split(tmp_path / "b", domain, classes, 4, 32, seed=7)
    assert rows_a == rows_b
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 12 and files_a == files_b
    # a different seed gives different images
    gen.write_split(tmp_path / "c", domain, classes, 4, 32, seed=8)
    assert _files(tmp_path / "c") != files_a


def test_write_split_rows(tmp_path: Path) -> None:
    classes = ["red circle", "blue square"]
    rows = gen.write_split(tmp_path, "shapes", classes, 2, 32, seed=0)
    assert rows == [("red_circle/00000.png", 0, "red circle"), ("red_circle/00001.png", 0, "red circle"),
                    ("blue_square/00000.png", 1, "blue square"), ("blue_square/00001.png", 1, "blue square")]
    assert all((tmp_path / rel).is_file() for rel, _, _ in rows)


@pytest.mark.parametrize("domain", gen.DOMAINS)
def test_render_equal_seeds_equal_arrays(domain: str) -> None:
    name = gen.class_names(domain)[0]
    a = gen.render(domain, name, _rng(123))
    b = gen.render(domain, name, _rng(123))
    c = gen.render(domain, name, _rng(124))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert gen.render(domain, name, _rng(1), size=20).shape == (20, 20, 3)


def test_adding_classes_and_images_keeps_existing_images(tmp_path: Path) -> None:
    a, b, c = gen.class_slice("shapes", 0, 3)
    gen.write_split(tmp_path / "two", "shapes", [a, b], 3, 32, seed=1)
    gen.write_split(tmp_path / "three", "shapes", [a, b, c], 5, 32, seed=1)
    two, three = _files(tmp_path / "two"), _files(tmp_path / "three")
    assert len(two) == 6 and len(three) == 15
    assert all(three[k] == v for k, v in two.items())


@pytest.mark.parametrize("domain", gen.DOMAINS)
def test_class_names(domain: str) -> None:
    names = gen.class_names(domain)
    assert names == gen.class_names(domain)  # fixed order
    assert len(names) >= 20
    assert len(set(names)) == len(names)
    assert len({n.replace(" ", "_") for n in names}) == len(names)
    assert names != sorted(names)  # permuted, so slices mix attributes
    assert gen.class_slice(domain, 2, 5) == names[2:7]
    assert gen.class_slice(domain, 0, len(names)) == names
    with pytest.raises(ValueError, match=str(len(names))):
        gen.class_slice(domain, len(names) - 2, 3)


def test_catalogue_sizes_and_mixing() -> None:
    shapes = gen.class_names("shapes")
    assert len(shapes) == 80 and len(gen.class_names("textures")) == 48 and len(gen.class_names("glyphs")) == 26
    first = [n.split() for n in shapes[:10]]
    assert len({c for c, _ in first}) >= 4 and len({s for _, s in first}) >= 4
    assert "red circle" in shapes and "blue stripes" in gen.class_names("textures")
    assert {"the digit 3", "the letter K"} <= set(gen.class_names("glyphs"))


def test_unknown_domain_and_class() -> None:
    with pytest.raises(ValueError, match="shapes"):
        gen.class_names("nope")
    with pytest.raises(ValueError):
        gen.class_slice("nope", 0, 1)
    with pytest.raises(ValueError):
        gen.render("shapes", "plaid unicorn", _rng(0))


@pytest.mark.parametrize("domain", gen.DOMAINS)
def test_pngs_valid_rgb(tmp_path: Path, domain: str) -> None:
    rows = gen.write_split(tmp_path, domain, gen.class_slice(domain, 0, 2), 2, 24, seed=3)
    for rel, _, _ in rows:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (24, 24)
            arr = np.asarray(im)
        assert arr.std() > 10  # not blank


@pytest.mark.parametrize("domain", gen.DOMAINS)
def test_intra_class_variation(domain: str) -> None:
    name = gen.class_names(domain)[1]
    imgs = np.stack([gen.render(domain, name, _rng(i)).astype(np.float64) for i in range(4)])
    diffs = [np.abs(imgs[i] - imgs[j]).mean() for i in range(4) for j in range(i + 1, 4)]
    assert min(diffs) > 5.0


def test_shapes_separable_by_nearest_class_mean() -> None:
    classes = gen.class_slice("shapes", 0, 10)

    def feats(name: str, start: int, n: int) -> np.ndarray:
        imgs = np.stack([gen.render("shapes", name, _rng(1000 * k + 17), 32) for k in range(start, start + n)])
        return imgs.astype(np.float64).reshape(n, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(n, -1)

    means = np.stack([feats(c, 0, 20).mean(axis=0) for c in classes])
    correct = 0
    for label, c in enumerate(classes):
        test = feats(c, 20, 10)
        pred = np.argmin(((test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        correct += int((pred == label).sum())
    accuracy = correct / (10 * len(classes))
    assert accuracy > 3 * (1 / len(classes)), accuracy
