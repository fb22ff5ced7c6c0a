"""Decoded-image caches: the cached path gives the PIL path's tensors bit for bit under every deterministic
transform; the batched RandomResizedCrop + flip equals cropping and resizing each image; bad caches are refused."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from ifcl.data.decoded import crop_boxes, random_resized_crop_flip, write_decoded
from ifcl.data.loader import image_batches
from ifcl.data.manifest import DatasetError, write_manifest
from ifcl.data.transforms import decoded_file

SIZE = 24
IMAGE = {"image_size": SIZE, "mean": [0.48, 0.45, 0.4], "std": [0.27, 0.26, 0.28]}


@pytest.fixture
def manifest(tmp_path):
    """Images of different sizes and aspect ratios (some smaller than SIZE), one a greyscale PNG, in 3 classes."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(40, 30), (17, 33), (24, 24), (64, 20), (31, 31), (50, 70), (20, 16), (33, 45)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels[:, :, 0]) if i == 3 else Image.fromarray(pixels)
        path = tmp_path / f"img{i}.{'jpg' if i % 2 else 'png'}"
        img.save(path)
        rows.append((str(path), i % 3, f"class{i % 3}"))
    write_manifest(tmp_path / "train.csv", rows)
    return str(tmp_path / "train.csv")


@pytest.mark.parametrize("transform", ["resize", "resize-center-crop", "clip"])
def test_cached_batches_equal_the_pil_batches_bit_for_bit(tmp_path, manifest, transform):
    cache = tmp_path / decoded_file("ds", "train", transform, SIZE)
    write_decoded(manifest, transform, SIZE, str(cache), threads=2)
    assert np.load(cache, mmap_mode="r").shape == (8, SIZE, SIZE, 3)
    classes, order = [2, 0], [2, 1, 0]  # a subset, targets = positions in the class order
    pil = list(image_batches(manifest, classes, order, transform, IMAGE, 3, shuffle=True, seed=5))
    cached = list(image_batches(manifest, classes, order, transform, IMAGE, 3, shuffle=True, seed=5, decoded=str(cache)))
    assert len(pil) == len(cached) == 2  # 5 images of classes 0 and 2, batches of 3
    for (x, y), (xc, yc) in zip(pil, cached):
        assert xc.dtype == torch.float32 and xc.shape == x.shape
        assert torch.equal(x, xc) and torch.equal(y, yc)
    assert sorted(torch.cat([y for _, y in cached]).tolist()) == [0, 0, 2, 2, 2]


def test_batched_crop_equals_resizing_each_cropped_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 40, 40, generator=gen)
    boxes = crop_boxes(64, 40, 40, (0.08, 1.0), (3 / 4, 4 / 3), gen)
    flips = torch.rand(64, generator=gen) < 0.5
    out = random_resized_crop_flip(x, boxes, flips)
    assert flips.any() and (~flips).any()
    for k in range(64):
        top, left, h, w = (int(v) for v in boxes[k])
        ref = F.interpolate(x[k:k + 1, :, top:top + h, left:left + w], size=(40, 40), mode="bilinear",
                            align_corners=False)[0]
        torch.testing.assert_close(out[k], ref.flip(-1) if flips[k] else ref, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    boxes = crop_boxes(4000, 224, 224, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    area = h * w / 224**2
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.43  # within 3/4-4/3 up to rounding
    # the same distribution as torchvision's own sampler (first fitting draw of 10)
    torch.manual_seed(0)
    img = torch.zeros(1, 224, 224)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
                       dtype=torch.float32)
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / 224**2, ref[:, 3] / ref[:, 2]
    assert abs(float(area.mean() - ref_area.mean())) < 0.02 and abs(float(area.std() - ref_area.std())) < 0.02
    assert abs(float(torch.log(ratio).mean() - torch.log(ref_ratio).mean())) < 0.02
    assert abs(float(torch.log(ratio).std() - torch.log(ref_ratio).std())) < 0.02
    assert abs(float((top / (224 - h + 1)).mean()) - 0.5) < 0.03  # uniform position
    again = crop_boxes(4000, 224, 224, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert torch.equal(boxes, again)
    whole = crop_boxes(5, 30, 30, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(2))
    assert whole.tolist() == [[0.0, 0.0, 30.0, 30.0]] * 5
    assert math.isclose(float(crop_boxes(1, 10, 40, (1.0, 1.0), (1.0, 1.0), torch.Generator())[0, 3]), 10.0)


def test_training_batches_from_the_cache_are_augmented_and_seeded(tmp_path, manifest):
    cache = tmp_path / decoded_file("ds", "train", "random-resized-crop-flip", SIZE)
    assert cache.name == f"train-resize-{SIZE}.npy"
    write_decoded(manifest, "resize", SIZE, str(cache))
    run = [x for x, _ in image_batches(manifest, [0, 1, 2], [0, 1, 2], "random-resized-crop-flip", IMAGE, 4,
                                       shuffle=False, seed=3, decoded=str(cache))]
    again = [x for x, _ in image_batches(manifest, [0, 1, 2], [0, 1, 2], "random-resized-crop-flip", IMAGE, 4,
                                         shuffle=False, seed=3, decoded=str(cache))]
    plain = [x for x, _ in image_batches(manifest, [0, 1, 2], [0, 1, 2], "resize", IMAGE, 4, shuffle=False,
                                         decoded=str(cache))]
    assert all(torch.equal(a, b) for a, b in zip(run, again))
    assert run[0].shape == plain[0].shape == (4, 3, SIZE, SIZE)
    assert not torch.allclose(run[0], plain[0])  # cropped and resized, not the stored image


def test_bad_caches_and_transforms_are_refused(tmp_path, manifest):
    with pytest.raises(ValueError, match="deterministic transform"):
        write_decoded(manifest, "random-resized-crop-flip", SIZE, str(tmp_path / "x.npy"))
    np.save(tmp_path / "short.npy", np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="delete it to decode it again"):
        image_batches(manifest, [0], [0, 1, 2], "resize", IMAGE, 2, False, decoded=str(tmp_path / "short.npy"))
    with pytest.raises(DatasetError, match="cannot read image"):
        bad = tmp_path / "bad.csv"
        write_manifest(bad, [(str(tmp_path / "missing.png"), 0, "a")])
        write_decoded(str(bad), "resize", SIZE, str(tmp_path / "bad.npy"))
    assert not list(tmp_path.glob(".bad.npy*"))  # nothing half-written left behind
