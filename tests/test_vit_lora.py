import pytest
import torch

from ifcl.models.vit_lora import ViTLoRA, build_vit, random_reduction


def tiny_vit(depth=3):
    torch.manual_seed(0)
    return build_vit(image_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=4).eval()


def downs(model, gen, rank=4):
    d = model.embed_dim
    n = len(model.lora_blocks)
    return [random_reduction(d, rank, gen) for _ in range(n)], [random_reduction(d, rank, gen) for _ in range(n)]


def test_zero_up_projection_leaves_the_backbone_unchanged():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    ref = vit.forward_head(vit.forward_features(x), pre_logits=True)
    model = ViTLoRA(vit, rank=4)
    model.begin_task(*downs(model, torch.Generator().manual_seed(1)), num_classes=5)
    torch.testing.assert_close(model.features(x), ref, rtol=0, atol=1e-6)


def test_features_are_timms_cls_features_with_the_last_block_run_for_the_cls_token_only():
    model = ViTLoRA(tiny_vit(), rank=4)
    gen = torch.Generator().manual_seed(2)
    model.begin_task(*downs(model, gen), num_classes=5)
    with torch.no_grad():
        for l in model.lora_layers:
            l.up_k.normal_(generator=gen)
            l.up_v.normal_(generator=gen)
    model.set_trainable()
    x = torch.randn(3, 3, 16, 16)
    vit = model.vit
    full = vit.forward_head(vit.forward_features(x), pre_logits=True)  # every token through every block
    full_grads = torch.autograd.grad(full.square().sum(), model.trainable_parameters()[:-2])
    ours = model.features(x)
    assert ours.shape == (3, 32) and full.abs().max() > 0.1
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    ours_grads = torch.autograd.grad(ours.square().sum(), model.trainable_parameters()[:-2])
    for a, b in zip(ours_grads, full_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    from ifcl.models.vit_lora import cls_through_block
    seq = torch.randn(2, 17, 32)
    torch.testing.assert_close(cls_through_block(vit.blocks[1], seq), vit.blocks[1](seq)[:, :1], rtol=0, atol=1e-5)
    pooled = tiny_vit()
    pooled.reset_classifier(0, global_pool="avg")
    with pytest.raises(ValueError, match="CLS token"):
        ViTLoRA(pooled, rank=2)


def test_lora_is_a_weight_delta_on_k_and_v_and_merging_keeps_the_function():
    model = ViTLoRA(tiny_vit(), rank=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    model.begin_task(*downs(model, gen), num_classes=5)
    layer = model.lora_layers[1]
    with torch.no_grad():
        for l in model.lora_layers:
            l.up_k.normal_(generator=gen)
            l.up_v.normal_(generator=gen)
    # direct check of one layer: k and v shifted by x R^T E^T, q untouched
    h = torch.randn(2, 7, 32)
    W, b = layer.qkv.weight, layer.qkv.bias
    expected = h @ W.T + b
    expected[..., 32:64] += h @ (layer.up_k @ layer.down_k).T
    expected[..., 64:] += h @ (layer.up_v @ layer.down_v).T
    torch.testing.assert_close(layer(h), expected, atol=1e-5, rtol=1e-5)
    before = model(x)
    model.end_task()
    assert not any(l.active for l in model.lora_layers)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_only_current_up_projections_and_head_train():
    model = ViTLoRA(tiny_vit(), rank=2, lora_blocks=[0, 2])
    gen = torch.Generator().manual_seed(0)
    model.begin_task(*downs(model, gen, rank=2), num_classes=3)
    model.end_task()
    model.begin_task(*downs(model, gen, rank=2), num_classes=4)
    model.set_trainable()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vit.blocks.0.attn.qkv.up_k", "vit.blocks.0.attn.qkv.up_v",
                         "vit.blocks.2.attn.qkv.up_k", "vit.blocks.2.attn.qkv.up_v",
                         "heads.1.weight", "heads.1.bias"}
    assert sum(p.numel() for p in model.trainable_parameters()) == 2 * 2 * 32 * 2 + 4 * 32 + 4
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 7) and model.forward_current(x).shape == (2, 4)
    # down-projections are buffers, never trained
    assert all(not isinstance(l.down_k, torch.nn.Parameter) for l in model.lora_layers)


def test_lora_blocks_subset_and_validation():
    model = ViTLoRA(tiny_vit(depth=4), rank=2, lora_blocks=[0, 1])
    assert len(model.lora_layers) == 2
    assert not hasattr(model.vit.blocks[3].attn.qkv, "up_k")
    with pytest.raises(ValueError):
        ViTLoRA(tiny_vit(depth=2), rank=2, lora_blocks=[5])


def test_second_moment_collection_matches_xtx_over_n():
    model = ViTLoRA(tiny_vit(), rank=2)
    for l in model.lora_layers:
        l.start_collecting()
    seen = []
    first, last = [], []  # the last block too: its keys and values need every token's input
    hooks = [model.vit.blocks[i].norm1.register_forward_hook(
        lambda m, i, o, out=out: out.append(o.detach().reshape(-1, 32))) for i, out in ((0, first), (-1, last))]
    with torch.no_grad():
        model.features(torch.randn(3, 3, 16, 16))
        model.features(torch.randn(2, 3, 16, 16))
    for hook in hooks:
        hook.remove()
    for layer, seen in ((model.lora_layers[0], first), (model.lora_layers[-1], last)):
        X = torch.cat(seen)
        assert X.shape[0] == 5 * 17
        torch.testing.assert_close(layer.stop_collecting(), X.T @ X / X.shape[0], atol=1e-5, rtol=1e-5)


def test_random_reduction_is_lora_default_init():
    r = random_reduction(768, 10, torch.Generator().manual_seed(0))
    assert r.shape == (10, 768)
    assert r.abs().max() <= 1 / 768 ** 0.5
    # expected row norm of U(-1/sqrt(d), 1/sqrt(d)) rows is 1/sqrt(3) (liangyanshuo/InfLoRA methods/inflora.py scales R_t so)
    assert r.norm(dim=1).mean().item() == pytest.approx(3 ** -0.5, rel=0.02)


def test_timm_backbone_loads_from_a_local_file_only(tmp_path):
    import timm
    from safetensors.torch import save_file

    from ifcl.models.vit_lora import load_backbone

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    spec = {"type": "timm", "name": "vit_tiny_patch16_224", "weights": str(tmp_path / "w.safetensors"),
            "image_size": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}
    vit = load_backbone(spec, tmp_path / "w.safetensors")
    assert torch.equal(vit.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert vit.num_classes == 0  # the classifier head of the file is dropped
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_backbone(spec, tmp_path / "missing.safetensors")


def test_final_norm_reset_is_the_official_cifar_ca_recipe(tmp_path):
    from ifcl.steps.inflora import build_model
    from ifcl.state import save_state

    vit = tiny_vit()
    with torch.no_grad():
        vit.norm.weight.fill_(2.0)
    save_state(tmp_path / "b.safetensors", vit.state_dict(), {})
    spec = {"type": "pretrain", "image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
            "arch": {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 4.0}}
    exp = {"rank": 2, "lora_blocks": "all", "final_norm": "pretrained"}
    kept = build_model(exp, spec, tmp_path / "b.safetensors")
    reset = build_model({**exp, "final_norm": "reset"}, spec, tmp_path / "b.safetensors")
    assert torch.all(kept.vit.norm.weight == 2.0)
    assert torch.all(reset.vit.norm.weight == 1.0) and torch.all(reset.vit.norm.bias == 0.0)
    assert reset.vit.norm.eps == 1e-5 and not reset.vit.norm.weight.requires_grad
