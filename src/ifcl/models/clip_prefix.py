"""open_clip's CLIP with DIKI's residual prefix attention (lloongx/DIKI).

In the first ``depth`` residual attention blocks of each tower, a task's key/value prefixes (``length`` tokens,
already projected, keys U(−1, 1) and values 0 at creation) get their own softmax, whose output is added, scaled by
λ, to the frozen attention before the frozen output projection:

    Out = [A_orig + λ·softmax(Q P_Kᵀ / √d) P_V] W_o + b_o = MHA(x) + λ·[softmax(Q P_Kᵀ / √d) P_V] W_o

With no prefixes installed the block is the original ``nn.MultiheadAttention`` module, bit for bit. With prefixes,
one packed in-projection gives Q, K and V, both softmaxes run as fused attention, and the λ-scaled sum goes
through the output projection once, as the official code computes it; with λ = 0 or zero values that is the frozen
attention up to float rounding. A task's prefixes are a plain dict of tensors (``visual.<i>.key`` …,
``text.<i>.value``), one dict per task: only the current task's tensors are trained.

The MLPs' QuickGELU is folded into their projections (:func:`fold_quick_gelu`): the same function with one
elementwise pass instead of three, which on a CPU is ~15% of a tower's time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def residual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                       prefix_v: torch.Tensor, weight: torch.Tensor | float, attn_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """DIKI's attention on head-split tensors: q, k, v [B, H, N, d], prefixes [B, H, L, d], ``weight`` [B] or a
    scalar; ``attn_mask`` (additive or boolean) applies to the original tokens only. Returns [B, H, N, d]."""
    original = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return original + _weighted(prefix_attention(q, prefix_k, prefix_v), weight)


def prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> torch.Tensor:
    """softmax(Q P_Kᵀ / √d) P_V, the prefixes' separate softmax (no mask: every position sees every prefix)."""
    return F.scaled_dot_product_attention(q, prefix_k, prefix_v)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                    prefix_v: torch.Tensor, weight: torch.Tensor | float, attn_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The ablation of DIKI's residual attention (``prefix.attention: softmax``): prefix tuning's attention, where
    the prefixes join the original keys and values in one softmax,

        softmax([Q P_Kᵀ / √d + log λ, Q Kᵀ / √d]) [P_V; V],

    λ scaling the prefixes' unnormalised attention weights: λ = 1 is plain prefix tuning, λ = 0 the frozen
    attention. Shapes and ``attn_mask`` (on the original tokens only) as :func:`residual_attention`."""
    b, _, n, _ = q.shape
    length = prefix_k.shape[2]
    bias = torch.zeros(b, 1, n, length + k.shape[2], dtype=q.dtype, device=q.device)
    lam = torch.as_tensor(weight, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    bias[..., :length] = torch.log(lam).to(q.dtype).view(-1, 1, 1, 1)  # added after the 1/√d scaling
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # True = may attend
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
        bias[..., length:] = bias[..., length:] + attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2),
                                          attn_mask=bias)


def _weighted(x: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return x * weight.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * weight


# prefix.attention: DIKI's residual branch (official) or, as an ablation, one softmax with the original tokens
ATTENTIONS = {"residual": residual_attention, "softmax": joint_attention}


class PrefixAttention(nn.Module):
    """Drop-in for a block's ``nn.MultiheadAttention`` (batch first): the frozen module plus the residual prefix
    term. ``prefix`` = (keys, values) of shape [B or 1, L, D] and ``weight`` are set by :class:`CLIPPrefix`."""

    def __init__(self, mha: nn.MultiheadAttention, attention: str = "residual"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"prefix attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        self.attend = ATTENTIONS[attention]
        if not isinstance(mha, nn.MultiheadAttention):
            import open_clip

            raise TypeError(f"PrefixAttention replaces torch's nn.MultiheadAttention in open_clip's residual blocks; "
                            f"open_clip {open_clip.__version__} has {type(mha).__module__}.{type(mha).__name__} there. "
                            "Install the open_clip_torch release pyproject.toml allows (<4).")
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("PrefixAttention expects a batch-first self-attention with a packed in-projection")
        self.mha = mha
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.weight: torch.Tensor | float = 1.0

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **kwargs):
        if self.prefix is None:
            return self.mha(query, key, value, need_weights=False, attn_mask=attn_mask,
                            key_padding_mask=key_padding_mask)[0], None
        if value is not key or key_padding_mask is not None:
            raise ValueError("prefixed attention takes keys and values from one sequence, without a padding mask")
        b, n, d = query.shape
        h, w, bias = self.mha.num_heads, self.mha.in_proj_weight, self.mha.in_proj_bias
        if key is query:  # self-attention: one packed projection
            q, k, v = F.linear(query, w, bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        else:  # queries of some tokens only (the last block's class token), keys and values of all
            q = F.linear(query, w[:d], None if bias is None else bias[:d]).view(b, n, h, d // h).transpose(1, 2)
            k, v = F.linear(key, w[d:], None if bias is None else bias[d:]).view(b, -1, 2, h, d // h).permute(
                2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MultiheadAttention: True = may not attend
            attn_mask = attn_mask.logical_not()
        pk, pv = (p.to(q.dtype).expand(b, -1, -1).reshape(b, -1, h, d // h).transpose(1, 2) for p in self.prefix)
        heads = self.attend(q, k, v, pk, pv, self.weight, attn_mask=attn_mask)
        return self.mha.out_proj(heads.transpose(1, 2).reshape(b, n, d)), None


def fold_quick_gelu(mlp: nn.Module) -> None:
    """Rewrite an open_clip MLP (``c_fc`` → QuickGELU → ``c_proj``) in place as the same function with SiLU:
    QuickGELU(h) = h·σ(1.702 h) = SiLU(1.702 h) / 1.702, so ``c_fc`` is scaled by 1.702, ``c_proj``'s weight by
    1 / 1.702, and the activation is one in-place SiLU. Results differ by float rounding only. MLPs with any other
    activation are left as they are."""
    from open_clip.transformer import QuickGELU

    if not isinstance(getattr(mlp, "gelu", None), QuickGELU):
        return
    with torch.no_grad():
        mlp.c_fc.weight.mul_(1.702)
        mlp.c_fc.bias.mul_(1.702)
        mlp.c_proj.weight.div_(1.702)
    mlp.gelu = nn.SiLU(inplace=True)


class CLIPPrefix(nn.Module):
    """A frozen open_clip ``CLIP`` whose first ``depth_vision`` / ``depth_text`` blocks take task prefixes. The
    model is rewritten in place (prefix attention in those blocks, :func:`fold_quick_gelu` in every MLP unless
    ``fold_gelu`` is False): it computes the same function as the CLIP it was given, which it owns from then on.
    ``attention``: how the prefixes enter (:data:`ATTENTIONS`)."""

    TOWERS = ("visual", "text")

    def __init__(self, clip: nn.Module, depth_vision: int = 8, depth_text: int = 8, length: int = 8,
                 fold_gelu: bool = True, attention: str = "residual"):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.length = length
        self.layers: dict[str, list[PrefixAttention]] = {}
        for tower, blocks, depth in (("visual", clip.visual.transformer.resblocks, depth_vision),
                                     ("text", clip.transformer.resblocks, depth_text)):
            if depth > len(blocks):
                raise ValueError(f"{tower} tower has {len(blocks)} blocks, fewer than the prefix depth {depth}")
            self.layers[tower] = []
            for block in list(blocks)[:depth]:
                block.attn = PrefixAttention(block.attn, attention)
                self.layers[tower].append(block.attn)
            for block in blocks if fold_gelu else ():
                fold_quick_gelu(block.mlp)

    # ---- prefixes ----
    def prefix_shapes(self) -> dict[str, tuple[int, int]]:
        return {f"{tower}.{i}.{kind}": (self.length, layer.mha.embed_dim)
                for tower in self.TOWERS for i, layer in enumerate(self.layers[tower]) for kind in ("key", "value")}

    def new_prefix(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A task's initial prefixes: keys U(−1, 1), values 0 (lloongx/DIKI)."""
        out = {}
        for name, shape in self.prefix_shapes().items():
            out[name] = torch.rand(shape, generator=generator) * 2 - 1 if name.endswith("key") else torch.zeros(shape)
        return out

    def trainable_parameters(self) -> int:
        return sum(math.prod(s) for s in self.prefix_shapes().values())

    def _install(self, tower: str, prefix: dict[str, torch.Tensor] | None, weight, per_sample=None) -> None:
        for i, layer in enumerate(self.layers[tower]):
            if prefix is None and per_sample is None:
                layer.prefix = None
                continue
            if per_sample is not None:  # one prefix dict per sample -> [B, L, D]
                k = torch.stack([p[f"{tower}.{i}.key"] for p in per_sample])
                v = torch.stack([p[f"{tower}.{i}.value"] for p in per_sample])
            else:
                k, v = prefix[f"{tower}.{i}.key"][None], prefix[f"{tower}.{i}.value"][None]
            layer.prefix, layer.weight = (k, v), weight

    # ---- towers ----
    def encode_image(self, images: torch.Tensor, prefix: dict | None = None, weight=1.0,
                     per_sample: list[dict] | None = None) -> torch.Tensor:
        """L2-normalised image features; ``prefix`` (one task for the batch) or ``per_sample`` (one per image),
        scaled by ``weight`` (scalar or [B]). The last block runs for the class token only
        (:func:`encode_image_cls`)."""
        self._install("visual", prefix, weight, per_sample)
        try:
            return F.normalize(encode_image_cls(self.clip.visual, images), dim=-1)
        finally:
            self._install("visual", None, 1.0)

    def encode_text(self, tokens: torch.Tensor, prefix: dict | None = None, weight=1.0) -> torch.Tensor:
        """L2-normalised text features of tokenised prompts, one task's prefixes scaled by one ``weight``
        (:func:`encode_text_to_end`: only the positions up to the longest prompt's end token are computed)."""
        self._install("text", prefix, weight)
        try:
            return F.normalize(encode_text_to_end(self.clip, tokens), dim=-1)
        finally:
            self._install("text", None, 1.0)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()


def encode_image_cls(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` for a tower pooled by its class token, with the last block run for
    that token alone (:func:`class_token_through`): the other tokens' outputs of that block are never read. Results
    differ from ``visual(images)`` by float rounding only. Towers pooled otherwise run ``visual(images)``."""
    if (visual.pool_type != "tok" or visual.attn_pool is not None or visual.output_tokens
            or not visual.transformer.batch_first):
        return visual(images)
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    pooled, _ = visual._pool(class_token_through(blocks[-1], x))
    return pooled @ visual.proj if visual.proj is not None else pooled


def class_token_through(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on x [B, N, D] for the first token's output only: its query against
    every token's key and value, then its MLP. Returns [B, 1, D]."""
    h = block.ln_1(x)
    y = x[:, :1] + block.ls_1(block.attn(h[:, :1], h, h, need_weights=False)[0])
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def encode_text_to_end(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on the positions up to the longest prompt's end token only.

    The feature is the output at the end token (the highest token id), and the causal mask keeps every later
    (padding) position from reaching it, so the function is the same as on the full context (77 positions for
    CLIP, where a class prompt is ~10 tokens long), at a fraction of the cost; results differ from the full-context
    computation by float rounding only (~1e-6). Models pooled otherwise fall back to ``encode_text``."""
    if getattr(clip, "text_pool_type", None) != "argmax" or getattr(clip, "attn_mask", None) is None:
        return clip.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


def build_clip(spec: dict) -> nn.Module:
    """An untrained open_clip ``CLIP`` of a ``pretrain_clip`` backbone's sizes (``spec['arch']``)."""
    import open_clip

    a = spec["arch"]
    v, t = a["vision"], a["text"]
    return open_clip.CLIP(
        embed_dim=a["embed_dim"], quick_gelu=True,
        vision_cfg=dict(image_size=spec["image_size"], layers=v["layers"], width=v["width"], patch_size=v["patch_size"],
                        head_width=v["head_width"]),
        text_cfg=dict(context_length=t["context_length"], vocab_size=49408, width=t["width"], heads=t["heads"],
                      layers=t["layers"]))


def load_clip(spec: dict, weights: str) -> nn.Module:
    """The frozen CLIP of a backbone spec, weights from a local file only.

    ``pretrain_clip``: the sizes in ``spec['arch']`` and the safetensors state of the pretraining rule.
    ``open_clip``: ``open_clip.create_model(spec['name'])`` (QuickGELU as OpenAI's weights need) loading ``weights``."""
    from pathlib import Path

    if not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights {weights} do not exist")
    if spec["type"] == "pretrain_clip":
        from ..state import load_state

        clip = build_clip(spec)
        clip.load_state_dict(load_state(weights)[0])
    else:
        from .weights import check_weights

        check_weights(weights)
        import open_clip

        clip = open_clip.create_model(spec["name"], pretrained=str(weights), force_quick_gelu=spec.get("quick_gelu", True))
    return clip.eval().requires_grad_(False)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")(texts, context_length=context_length)


DEFAULT_TEMPLATE = "a photo of a {}."


def prompts(class_names: list[str], template: str | None) -> list[str]:
    """One sentence per class with the dataset's single template (lloongx/DIKI: underscores -> spaces)."""
    return [(template or DEFAULT_TEMPLATE).format(name).replace("_", " ") for name in class_names]
