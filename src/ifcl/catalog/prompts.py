"""L2P (the L2P++ prefix variant), DualPrompt and CODA-Prompt as ``GT-RIPL/CODA-Prompt`` computes them: a frozen ViT
with a pool of key/value prefixes chosen by each image's query, one head per task. Math:
:mod:`ifcl.methods.prompts`; model: :class:`ifcl.models.vit_prompt.PromptedViT`; the ``state`` chain's steps
(:mod:`ifcl.steps.state`): task t's file holds the pool after task t and head t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check_blocks
from ..registry import Method
from ..settings import setting


POOL = ("The prompt methods' pool (GT-RIPL/CODA-Prompt models/zoo.py); the keys each method reads. Prefixes are "
        "key/value tokens prepended inside the attention of the blocks listed in layers (prefix tuning).")


@dataclass(frozen=True, kw_only=True)
class Pool:
    """The keys every prompt method's pool reads."""

    pool_size: int = setting(doc="prompts in the pool (L2P 30; DualPrompt: e-prompts, one per task; CODA-Prompt: "
                                 "components, 100)", minimum=1)
    length: int = setting(doc="tokens of a prompt, half keys and half values (L2P 20, DualPrompt 20, CODA-Prompt 8)",
                          minimum=2, multiple_of=2)
    layers: list[int] = setting(doc="the prompted blocks (L2P [0], DualPrompt's e-prompts [2, 3, 4], CODA-Prompt "
                                    "[0, 1, 2, 3, 4])", items_minimum=0, min_items=1, unique_items=True)


@dataclass(frozen=True, kw_only=True)
class L2PPool(Pool):
    top_k: int = setting(doc="L2P: prompts chosen per image (5)", minimum=1)
    key_loss: Literal["official", "per_image"] = setting(
        doc="L2P: official: the key-matching loss as the official code computes it, (1 - cos[:, idx]).sum() over a "
            "[batch, batch, top_k] index (every image against the keys chosen by every image of the batch); "
            "per_image: each image against its own chosen keys")


@dataclass(frozen=True, kw_only=True)
class DualPromptPool(Pool):
    g_length: int = setting(doc="DualPrompt: tokens of the shared g-prompt (6)", minimum=2, multiple_of=2)
    g_layers: list[int] = setting(doc="DualPrompt: the blocks of the g-prompt ([0, 1])", items_minimum=0,
                                  unique_items=True)


@dataclass(frozen=True, kw_only=True)
class CodaPromptPool(Pool):
    ortho_mu: float = setting(doc="CODA-Prompt: weight of the orthogonality penalty (0.0 in the official scripts)",
                              minimum=0)


@dataclass(frozen=True, kw_only=True)
class L2P:
    prompt: L2PPool = setting(doc=POOL)


@dataclass(frozen=True, kw_only=True)
class DualPrompt:
    prompt: DualPromptPool = setting(doc=POOL)


@dataclass(frozen=True, kw_only=True)
class CodaPrompt:
    prompt: CodaPromptPool = setting(doc=POOL)


# the methods whose pool needs a prompt per task, and why
PER_TASK = {"dualprompt": "DualPrompt trains e-prompt t for task t",
            "coda-prompt": "CODA-Prompt gives each task pool_size // num_tasks components"}


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {f"prompt.{k}": spec["prompt"].get(k) for k in ("layers", "g_layers")})
    if spec["method"] in PER_TASK and spec["prompt"]["pool_size"] < spec["num_tasks"]:
        raise ConfigError(f"{key}.prompt.pool_size: {PER_TASK[spec['method']]}, so the pool needs at least "
                          f"num_tasks ({spec['num_tasks']}) prompts, not {spec['prompt']['pool_size']}")


def _method(name: str, title: str, description: str, settings: type) -> Method:
    return Method(name=name, protocol="cil", title=title, description=description,
                  model="ifcl.models.vit_prompt:build", settings=settings, model_keys=("num_tasks", "prompt"),
                  check=check, group="prompts",
                  drop_last=True)  # GT-RIPL/CODA-Prompt trainer.py: DataLoader(..., shuffle=True, drop_last=True)


METHODS = (
    _method("l2p", "L2P++", "a frozen ViT with a pool of key/value prefixes, the top-k chosen by each image's query "
                            "(settings under prompt; GT-RIPL/CODA-Prompt)", L2P),
    _method("dualprompt", "DualPrompt", "task-shared g-prompts and one e-prompt per task, chosen by the image's "
                                        "query at test time (settings under prompt; GT-RIPL/CODA-Prompt)", DualPrompt),
    _method("coda-prompt", "CODA-Prompt", "a prompt assembled from components weighted by the attended query, "
                                          "each task adding its own (settings under prompt; GT-RIPL/CODA-Prompt)", CodaPrompt),
)
