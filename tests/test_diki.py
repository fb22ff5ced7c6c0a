"""DIKI on tensors: residual prefix attention (lloongx/DIKI clip/attention.py), task Gaussians and calibration
(DIKI/DIKI.py), the per-iteration schedule."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.diki import calibrate, fit_gaussian, iteration_lrs, log_likelihoods, majority_task
from ifcl.models.clip_prefix import CLIPPrefix, PrefixAttention, joint_attention, residual_attention


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    clip = open_clip.CLIP(embed_dim=32, quick_gelu=True,
                          vision_cfg=dict(image_size=32, layers=3, width=48, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=3))
    return clip.eval()


def tokens(texts, length=16):
    return open_clip.get_tokenizer("ViT-B-16")(texts, context_length=length)


def direct(q, k, v, pk, pv, weight, mask=None):
    """The formula of lloongx/DIKI clip/attention.py written out: two separate softmaxes, the prefix one scaled per sample."""
    d = q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    original = scores.softmax(-1) @ v
    extra = (q @ pk.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ pv
    return original + weight.view(-1, 1, 1, 1) * extra


def test_residual_attention_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    b, h, n, length, d = 3, 2, 7, 4, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(b, generator=g, dtype=torch.float64)
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)  # causal, as in the text tower
    out = residual_attention(q, k, v, pk, pv, w, attn_mask=mask)
    assert out.shape == (b, h, n, d)
    torch.testing.assert_close(out, direct(q, k, v, pk, pv, w, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(residual_attention(q, k, v, pk, pv, 0.0), F.scaled_dot_product_attention(q, k, v))


def joint_direct(q, k, v, pk, pv, weight, mask=None):
    """Prefix tuning's attention written out: exp-scores of the prefixes scaled by λ, one normalisation."""
    d = q.shape[-1]
    original = (q @ k.transpose(-1, -2) / math.sqrt(d) + (0 if mask is None else mask)).exp()
    extra = (q @ pk.transpose(-1, -2) / math.sqrt(d)).exp() * weight.view(-1, 1, 1, 1)
    return (extra @ pv + original @ v) / (extra.sum(-1, keepdim=True) + original.sum(-1, keepdim=True))


def test_the_softmax_ablation_is_prefix_tuning_with_lambda_scaling_the_prefix_weights():
    g = torch.Generator().manual_seed(1)
    b, h, n, length, d = 3, 2, 7, 4, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.tensor([0.2, 1.0, 0.7], dtype=torch.float64)
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    out = joint_attention(q, k, v, pk, pv, w, attn_mask=causal)
    torch.testing.assert_close(out, joint_direct(q, k, v, pk, pv, w, causal), rtol=1e-12, atol=1e-12)
    # a boolean mask (True: may attend) is the same mask
    torch.testing.assert_close(joint_attention(q, k, v, pk, pv, w, attn_mask=causal == 0), out, rtol=1e-12, atol=1e-12)
    # λ = 0: the frozen attention; λ = 1: one softmax over [prefixes; tokens]; not DIKI's residual branch
    torch.testing.assert_close(joint_attention(q, k, v, pk, pv, 0.0), F.scaled_dot_product_attention(q, k, v))
    plain = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2))
    torch.testing.assert_close(joint_attention(q, k, v, pk, pv, 1.0), plain, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, residual_attention(q, k, v, pk, pv, w, attn_mask=causal))
    # through a model: prefixes with the ablation change the features, and λ = 0 leaves the frozen CLIP
    model = CLIPPrefix(tiny_clip(), depth_vision=2, depth_text=2, length=4, attention="softmax")
    x = torch.rand(2, 3, 32, 32)
    trained = {k: torch.randn_like(p) for k, p in model.new_prefix(torch.Generator().manual_seed(0)).items()}
    torch.testing.assert_close(model.encode_image(x, trained, weight=torch.zeros(2)), model.encode_image(x),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(model.encode_image(x, trained), model.encode_image(x))
    with pytest.raises(ValueError, match="prefix attention must be one of"):
        CLIPPrefix(tiny_clip(), depth_vision=1, depth_text=1, length=2, attention="concat")


def test_prefix_attention_module_equals_the_formula_through_the_projections():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    layer = PrefixAttention(mha)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pk, pv = torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64)
    w = torch.tensor([0.3, 0.9], dtype=torch.float64)
    layer.prefix, layer.weight = (pk, pv), w
    out, _ = layer(x, x, x)
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    split = lambda p: p.expand(2, -1, -1).view(2, 3, 4, 4).transpose(1, 2)
    heads = direct(qkv[0], qkv[1], qkv[2], split(pk), split(pv), w)
    expected = F.linear(heads.transpose(1, 2).reshape(2, 5, 16), mha.out_proj.weight, mha.out_proj.bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # queries of the first token only (the class token in a tower's last block), keys and values of all tokens
    first, _ = layer(x[:, :1], x, x)
    torch.testing.assert_close(first, expected[:, :1], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one sequence"):
        layer(x, x, x.clone())


def test_image_features_with_the_last_block_for_the_class_token_only():
    from ifcl.models.clip_prefix import class_token_through

    clip = tiny_clip()
    x = torch.rand(3, 3, 32, 32)
    block = clip.visual.transformer.resblocks[-1]
    seq = torch.randn(3, 17, 48)
    with torch.no_grad():
        torch.testing.assert_close(class_token_through(block, seq), block(seq)[:, :1], rtol=0, atol=1e-5)
        original = F.normalize(clip.encode_image(x), dim=-1)
    model = CLIPPrefix(clip, depth_vision=3, depth_text=3, length=4)  # the last block prefixed too
    trained = {k: torch.randn_like(p) for k, p in model.new_prefix(torch.Generator().manual_seed(0)).items()}
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), original, rtol=0, atol=1e-6)
        model._install("visual", trained, torch.full((3,), 0.5))
        try:  # every token through every block, open_clip's own forward
            full = F.normalize(model.clip.encode_image(x), dim=-1)
        finally:
            model._install("visual", None, 1.0)
        ours = model.encode_image(x, trained, torch.full((3,), 0.5))
    assert not torch.allclose(ours, original, atol=1e-3)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)


def test_frozen_clip_when_no_prefix_weight_zero_or_values_zero():
    clip = tiny_clip()
    x, tok = torch.rand(4, 3, 32, 32), tokens(["a red circle", "the digit 3"])
    with torch.no_grad():  # open_clip's own computation, before CLIPPrefix rewrites the model
        original_image = F.normalize(clip.encode_image(x), dim=-1)
        original_text = F.normalize(clip.encode_text(tok), dim=-1)
    model = CLIPPrefix(clip, depth_vision=2, depth_text=2, length=4)
    assert all(isinstance(b.mlp.gelu, torch.nn.SiLU) for b in clip.visual.transformer.resblocks)  # folded
    frozen_image = model.encode_image(x)  # no prefixes installed: the frozen towers
    frozen_text = model.encode_text(tok)
    # QuickGELU folded into SiLU, the text tower computed to the end token only: open_clip's CLIP up to rounding
    torch.testing.assert_close(frozen_image, original_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(frozen_text, original_text, rtol=0, atol=1e-5)
    fresh = model.new_prefix(torch.Generator().manual_seed(0))  # values 0
    trained = {k: torch.randn_like(p) for k, p in fresh.items()}
    # with prefixes the block computes one packed projection and fused attention: the frozen CLIP up to rounding
    same = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_image(x, fresh), frozen_image, **same)
    torch.testing.assert_close(model.encode_text(tok, fresh), frozen_text, **same)
    torch.testing.assert_close(model.encode_image(x, trained, weight=torch.zeros(4)), frozen_image, **same)
    torch.testing.assert_close(model.encode_text(tok, trained, weight=0.0), frozen_text, **same)
    assert not torch.allclose(model.encode_image(x, trained), frozen_image)
    assert torch.equal(model.encode_image(x), frozen_image)  # nothing left installed
    # per-sample prefixes: a sample with task A's prefix gets what the batch-wide task A prefix gives it
    per_sample = model.encode_image(x, per_sample=[trained, fresh, trained, fresh], weight=torch.ones(4))
    torch.testing.assert_close(per_sample[0], model.encode_image(x, trained)[0])
    torch.testing.assert_close(per_sample[1], frozen_image[1])
    # unfolded (the benchmark's official-style reference): with no prefix it is open_clip's computation exactly
    unfolded = CLIPPrefix(tiny_clip(), depth_vision=2, depth_text=2, length=4, fold_gelu=False)
    with torch.no_grad():
        assert torch.equal(unfolded.clip.encode_image(x), tiny_clip().encode_image(x))


def test_prefix_initialisation_and_the_vit_b16_count():
    model = CLIPPrefix(tiny_clip(), depth_vision=2, depth_text=3, length=4)
    p = model.new_prefix(torch.Generator().manual_seed(1))
    assert all(torch.all(v == 0) for k, v in p.items() if k.endswith("value"))
    keys = torch.cat([v.flatten() for k, v in p.items() if k.endswith("key")])
    assert keys.min() >= -1 and keys.max() <= 1 and keys.std() > 0.5
    assert model.trainable_parameters() == 2 * 2 * 4 * 48 + 3 * 2 * 4 * 32
    vit_b16 = CLIPPrefix(open_clip.create_model("ViT-B-16", pretrained=None), 8, 8, 8)
    assert vit_b16.trainable_parameters() == 163_840  # the official 8/8/8 prefixes at ViT-B/16


def random_gaussians(d=6, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(t):
        a = torch.randn(d, d, generator=g) * 0.1
        out.append((torch.randn(d, generator=g) + 3 * i, a @ a.T + 0.05 * torch.eye(d)))
    return out


def test_fit_gaussian_is_mean_and_unbiased_covariance_plus_jitter():
    f = torch.randn(50, 5, dtype=torch.float64)
    g = fit_gaussian(f)
    torch.testing.assert_close(g.mean, f.mean(0).float())
    torch.testing.assert_close(g.covariance, (torch.cov(f.T) + 1e-7 * torch.eye(5)).float())


def test_log_likelihood_matches_torch_multivariate_normal():
    from ifcl.methods.diki import TaskGaussian

    gaussians = [TaskGaussian(m, c) for m, c in random_gaussians()]
    x = torch.randn(9, 6) * 2
    ours = log_likelihoods(x, gaussians)
    for t, g in enumerate(gaussians):
        reference = torch.distributions.MultivariateNormal(g.mean.double(), g.covariance.double()).log_prob(x.double())
        torch.testing.assert_close(ours[:, t], reference.float(), rtol=1e-5, atol=1e-4)


def test_calibration_picks_the_likeliest_task_and_the_official_weight():
    from ifcl.methods.diki import TaskGaussian

    gaussians = [TaskGaussian(m, c) for m, c in random_gaussians()]
    x = torch.stack([gaussians[i].mean + 0.01 * torch.randn(6) for i in (2, 2, 0, 1, 2)])
    ids, w = calibrate(x, gaussians, batchwise=False)
    assert ids.tolist() == [2, 2, 0, 1, 2]
    best = log_likelihoods(x, gaussians).max(1).values
    torch.testing.assert_close(w, torch.sigmoid(best / 6 - 1))
    ids_b, w_b = calibrate(x, gaussians, batchwise=True)
    assert ids_b.tolist() == [2] * 5 and torch.equal(w_b, w)  # majority task, each sample keeps its own λ
    _, w512 = calibrate(x, gaussians, batchwise=False, scale=512)
    torch.testing.assert_close(w512, torch.sigmoid(best / 512 - 1))
    assert majority_task(torch.tensor([1, 0, 1, 0, 3])) == 0  # ties go to the smaller task id
    ids_1, w_1 = calibrate(x, gaussians, batchwise=False, weight="one")  # the ablation without calibration
    assert ids_1.tolist() == ids.tolist() and torch.equal(w_1, torch.ones(5))
    with pytest.raises(ValueError, match="'likelihood' or 'one'"):
        calibrate(x, gaussians, weight="none")


def test_non_positive_definite_covariance_is_refused():
    from ifcl.methods.diki import TaskGaussian

    with pytest.raises(ValueError, match="positive definite"):
        TaskGaussian(torch.zeros(3), torch.zeros(3, 3))


def test_iteration_cosine_schedule():
    lrs = iteration_lrs(5.0, 100)
    assert lrs[0] == 5.0 and len(lrs) == 100
    assert abs(lrs[50] - (0.005 + 0.5 * (5.0 - 0.005))) < 1e-12
    assert lrs[-1] > 0.005 and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_the_installed_open_clip_has_the_attention_module_prefix_attention_replaces():
    """open_clip's residual blocks hold torch's nn.MultiheadAttention, whose packed in-projection PrefixAttention
    reads; a release that replaces it (pyproject.toml bounds open_clip_torch below 4) fails here, and in
    PrefixAttention itself with an error naming the installed version."""
    model = tiny_clip()
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    assert blocks and all(type(b.attn) is torch.nn.MultiheadAttention for b in blocks)
    assert all(b.attn.batch_first and b.attn._qkv_same_embed_dim and b.attn.in_proj_weight is not None for b in blocks)

    class OwnAttention(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match=f"open_clip {open_clip.__version__} has .*OwnAttention"):
        PrefixAttention(OwnAttention())
