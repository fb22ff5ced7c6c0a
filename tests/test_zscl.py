"""The full fine-tuning family of the MTIL benchmark (ifcl.methods.zscl) against hand-computed or independently
written cases of what ZSCL's official code computes (Thunderbeee/ZSCL mtil/src/models/helpers.py, finetune.py,
utils.py)."""
import math

import pytest
import torch

from ifcl.methods.zscl import (clip_logits, distillation, interpolate, l2_anchor, lr_at, running_average,
                               virtual_vocabulary, zscl_distillation)


def test_the_schedule_warms_up_linearly_then_falls_to_zero_by_a_cosine():
    assert lr_at(0, 1e-5, 100, 1000) == pytest.approx(1e-7)
    assert lr_at(99, 1e-5, 100, 1000) == pytest.approx(1e-5)
    assert lr_at(100, 1e-5, 100, 1000) == pytest.approx(1e-5)
    assert lr_at(550, 1e-5, 100, 1000) == pytest.approx(0.5e-5)
    assert lr_at(1000, 1e-5, 100, 1000) == pytest.approx(0.0, abs=1e-20)  # the loop's last (1,001st) step


def test_distillation_is_t_squared_times_the_cross_entropy_with_the_teachers_soft_targets():
    teacher = torch.tensor([[2.0, 0.0, -2.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    T = 2.0
    expected = 0.0
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        p = [math.exp(v / T) for v in t_row]
        p = [v / sum(p) for v in p]
        log_q = [v / T - math.log(sum(math.exp(u / T) for u in s_row)) for v in s_row]
        expected += -sum(pi * lq for pi, lq in zip(p, log_q))
    assert distillation(teacher, student, T).item() == pytest.approx(T**2 * expected / 2, rel=1e-6)
    assert distillation(teacher, teacher, T) < distillation(teacher, student, T)


def test_zscl_distillation_adds_the_image_and_the_text_directions():
    g = torch.Generator().manual_seed(0)
    student, teacher, texts = (torch.randn(4, 8, generator=g) for _ in range(3))
    scale = torch.tensor(math.log(10.0))

    def logits(images):  # written out: cosine similarities times 10
        a = images / images.norm(dim=1, keepdim=True)
        b = texts / texts.norm(dim=1, keepdim=True)
        return 10.0 * torch.einsum("id,jd->ij", a, b)

    s, t = logits(student), logits(teacher)
    both = zscl_distillation(student, teacher, texts, scale, T=2.0)
    image = zscl_distillation(student, teacher, texts, scale, T=2.0, text_loss=False)
    text = zscl_distillation(student, teacher, texts, scale, T=2.0, image_loss=False)
    assert torch.allclose(clip_logits(student, texts, scale), s, atol=1e-5)
    assert image.item() == pytest.approx(distillation(t, s).item(), rel=1e-5)
    assert text.item() == pytest.approx(distillation(t.t(), s.t()).item(), rel=1e-5)
    assert both.item() == pytest.approx(image.item() + text.item(), rel=1e-6)
    assert zscl_distillation(teacher, teacher, texts, scale).item() < both.item()


def test_the_l2_anchor_sums_squared_differences_and_holds_the_anchor_fixed():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[0.5]], requires_grad=True)
    anchor = {"w": torch.tensor([0.0, 0.0], requires_grad=True), "b": torch.tensor([[1.0]], requires_grad=True)}
    loss = l2_anchor({"w": w, "b": b}, anchor)
    assert loss.item() == pytest.approx(1 + 4 + 0.25)
    loss.backward()
    assert torch.equal(w.grad, 2 * w.detach()) and anchor["w"].grad is None


def test_the_weight_ensemble_is_the_uniform_mean_of_the_start_and_every_snapshot():
    snapshots = [torch.tensor([float(k), 2.0 * k]) for k in range(1, 6)]  # after steps 0, 100, ..., 400
    start = torch.tensor([10.0, -10.0])
    average = {"w": start.clone()}
    for count, snapshot in enumerate(snapshots, 1):
        running_average(average, {"w": snapshot}, count)
    assert torch.allclose(average["w"], torch.stack([start, *snapshots]).mean(0))


def test_wise_ft_interpolates_every_parameter():
    out = interpolate({"a": torch.tensor([1.0]), "b": torch.tensor([4.0])},
                      {"a": torch.tensor([0.0]), "b": torch.tensor([-1.0])}, 0.8)
    assert out["a"].item() == pytest.approx(0.8) and out["b"].item() == pytest.approx(3.0)


def test_the_virtual_vocabulary_is_random_tokens_between_start_and_end_padded_to_the_context():
    tokens = virtual_vocabulary(torch.Generator().manual_seed(0), vocab_size=49408, start=49406, end=49407,
                                length=10, count=5)
    assert tokens.shape == (5, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all() and (tokens[:, 11] == 49407).all() and (tokens[:, 12:] == 0).all()
    assert (tokens[:, 1:11] < 49408).all() and len(set(tokens[:, 1:11].flatten().tolist())) > 40


def _official_style_task(model, batches, tokens, lr, iterations, warmup, l2, every, ref_batches, ref_tokens, teacher):
    """One task of the family written as the official finetune.py loop is (a model copied for the L2 anchor and one
    for the weight ensemble, the data iterator renewed every len(batches) iterations, the losses added one by one),
    with the tiny CLIP's encode_image / encode_text for the official model(images, None) / model(None, texts)."""
    import copy

    def normed(t):
        return t / t.norm(dim=-1, keepdim=True)

    def soft_ce(t, s, T=2.0):
        return -(torch.softmax(t / T, 1) * torch.log_softmax(s / T, 1)).sum(1).mean() * T * T

    we_model, we_n, l2_model = copy.deepcopy(model), 0, copy.deepcopy(model)
    optimizer = torch.optim.AdamW([v for k, v in model.named_parameters() if k != "logit_scale"], lr=lr,
                                  weight_decay=0.0, betas=(0.9, 0.999))
    ref_iter = iter(ref_batches)
    for iteration in range(iterations + 1):
        if iteration % len(batches) == 0:
            data_iter = iter(batches)
        step_lr = lr * (iteration + 1) / warmup if iteration < warmup else \
            0.5 * (1 + math.cos(math.pi * (iteration - warmup) / (iterations - warmup))) * lr
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        images, labels = next(data_iter)
        logits = model.logit_scale.exp() * normed(model.encode_image(images)) @ normed(model.encode_text(tokens)).t()
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
        loss += l2 * sum(((p - q.detach()) ** 2).sum() for p, q in zip(model.parameters(), l2_model.parameters()))
        try:
            ref_images = next(ref_iter)
        except StopIteration:
            ref_iter = iter(ref_batches)
            ref_images = next(ref_iter)
        with torch.no_grad():
            ref_text = normed(teacher.encode_text(ref_tokens))
            ref_out = normed(teacher.encode_image(ref_images))
        current = normed(model.encode_image(ref_images))
        logits_current = model.logit_scale.exp() * current @ ref_text.t()
        logits_ref = model.logit_scale.exp() * ref_out @ ref_text.t()
        loss = loss + soft_ce(logits_ref, logits_current)
        loss += soft_ce(logits_ref.t(), logits_current.t())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % every == 0:
            we_n += 1
            for q, k in zip(model.parameters(), we_model.parameters()):
                k.data = (k.data * we_n + q.data) / (1.0 + we_n)
    return we_model.state_dict()


def test_one_task_of_zscl_as_the_official_loop_computes_it():
    """finetune with the reference distillation, the L2 anchor and the weight ensemble (ZSCL) gives the weights of
    the official loop's structure written out independently; and every weight but logit_scale moved."""
    from test_diki import tiny_clip, tokens

    from ifcl.methods.zscl import Recipe, Reference, finetune

    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    refs = [torch.rand(5, 3, 32, 32, generator=g) for _ in range(2)]
    prompts, ref_prompts = tokens(["a circle", "a square", "a star"]), tokens([f"word {i}" for i in range(6)])
    recipe = Recipe(lr=1e-3, iterations=7, warmup=2, l2=1.0, average_every=3)
    ours = finetune(tiny_clip(0), lambda: iter(batches), prompts, recipe,
                    Reference(lambda: iter(refs), ref_prompts, tiny_clip(1)))
    theirs = _official_style_task(tiny_clip(0), batches, prompts, 1e-3, 7, 2, 1.0, 3, refs, ref_prompts, tiny_clip(1))
    start = tiny_clip(0).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6), name
    moved = {name for name in ours if not torch.equal(ours[name], start[name])}
    params = {name for name, _ in tiny_clip(0).named_parameters()}
    assert moved == params - {"logit_scale"}


def _official_herding(features, m):
    """dynamic_dataset.constructExampleSet's loop written out with NumPy, as the official code runs it: returns the
    positions it indexes the image list with, and the candidates whose features it picked."""
    import numpy as np

    feats, ids = features.numpy().copy(), np.arange(len(features))
    mean = feats.mean(axis=0)
    positions, picked, total = [], [], None
    for k in range(min(m, len(features))):
        cur = feats if total is None else (feats + total) / (k + 1)
        index = int(np.argmin(np.sum((mean - cur) ** 2, axis=1)))
        total = feats[index].copy() if total is None else total + feats[index]
        positions.append(index)
        picked.append(int(ids[index]))
        feats, ids = np.delete(feats, index, axis=0), np.delete(ids, index)
    return positions, picked


def test_herding_picks_by_hand_and_keeps_the_images_the_official_code_keeps():
    """Three unit vectors, by hand: μ = (0.533, 0.6); the first pick is (0.6, 0.8) (distance 0.045), then (1, 0)
    (0.111 against 0.144), then (0, 1). The official code indexes the image list with the position in the shortened
    feature array: images 2, 0, 0."""
    from ifcl.methods.zscl import herding

    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert herding(features, 3, official_indexing=False) == [2, 0, 1]
    assert herding(features, 3) == [2, 0, 0]
    assert herding(features, 5, official_indexing=False) == [2, 0, 1]  # never more than the candidates
    g = torch.Generator().manual_seed(0)
    random = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=1)
    positions, picked = _official_herding(random, 25)
    assert herding(random, 25) == positions
    assert herding(random, 25, official_indexing=False) == picked
    assert positions != picked  # the two differ: the test can tell them apart


def test_the_memory_shares_as_dynamic_dataset_updates_them():
    """After task 0 the first K candidates; after task t each earlier dataset keeps its first K // (t + 1) and the
    new one brings its herding picks (K − K // (t + 1))."""
    from ifcl.methods.zscl import memory_after_task

    first = memory_after_task([], 0, 10, 30, [])
    assert first == [list(range(10))]
    assert memory_after_task([], 0, 10, 4, []) == [[0, 1, 2, 3]]
    second = memory_after_task(first, 1, 10, 30, [7, 3, 9, 1, 0])
    assert second == [[0, 1, 2, 3, 4], [7, 3, 9, 1, 0]]
    third = memory_after_task(second, 2, 10, 30, [5, 6, 7, 8, 9, 10, 11])
    assert third == [[0, 1, 2], [7, 3, 9], [5, 6, 7, 8, 9, 10, 11]]


def test_captions_are_read_from_the_conceptual_captions_list_and_checked_when_read(tmp_path):
    from ifcl.data.captions import read_captions, source_captions, write_captions
    from ifcl.files import FileCheckError

    raw = tmp_path / "raw" / "conceptual-captions"
    raw.mkdir(parents=True)
    (raw / "GCC-1.1.0-Validation.tsv").write_text('a dog, "running"\thttp://x/1.jpg\nthe sky\thttp://x/2.jpg\n\n')
    captions = source_captions({"type": "captions", "name": "conceptual_captions"}, tmp_path / "raw")
    assert captions == ['a dog, "running"', "the sky"]
    write_captions(tmp_path / "captions.csv", captions)
    assert read_captions(tmp_path / "captions.csv") == captions
    (tmp_path / "captions.csv").write_text("caption\nsomething else\n")
    with pytest.raises(FileCheckError):
        read_captions(tmp_path / "captions.csv")


def test_imagenet_is_read_as_class_folders_in_wnid_order(tmp_path):
    from ifcl.data.mtil import mtil_manifests

    raw = tmp_path / "mtil-imagenet"
    for split, wnid, name in (("train", "n02", "b.JPEG"), ("train", "n01", "a.JPEG"), ("train", "n01", "c.txt"),
                              ("val", "n01", "v.JPEG")):
        (raw / split / wnid).mkdir(parents=True, exist_ok=True)
        (raw / split / wnid / name).write_bytes(b"")
    parts = mtil_manifests({"type": "mtil", "name": "imagenet", "split_seed": 0}, tmp_path, None)
    assert parts["train"] == [(str(raw / "train/n01/a.JPEG"), 0, "n01"), (str(raw / "train/n02/b.JPEG"), 1, "n02")]
    assert parts["test"] == [(str(raw / "val/n01/v.JPEG"), 0, "n01")] and parts["val"] == []


def test_zscls_training_transform_is_a_bicubic_random_resized_crop_without_flip():
    """mtil/clip/clip.py _transform(is_train=True): RandomResizedCrop(n_px, scale=(0.9, 1.0), bicubic), no flip."""
    from torchvision import transforms as T

    from ifcl.data.transforms import geometric_ops

    (crop,) = geometric_ops("clip-train", 16, (0.9, 1.0))
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (16, 16) and crop.scale == (0.9, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
