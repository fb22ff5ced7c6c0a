"""L2P (the L2P++ prefix variant), DualPrompt and CODA-Prompt as ``GT-RIPL/CODA-Prompt`` computes them: a frozen ViT
with a pool of key/value prefixes chosen by each image's query, one head per task. Math:
:mod:`ifcl.methods.prompts`; model: :class:`ifcl.models.vit_prompt.PromptedViT`; the ``state`` chain's steps
(:mod:`ifcl.steps.state`): task t's file holds the pool after task t and head t.
"""
from __future__ import annotations

import copy

import yaml

from ..config import ConfigError, check_blocks
from ..registry import Method

PROMPT = yaml.safe_load("""
description: >-
  The prompt methods' pool (GT-RIPL/CODA-Prompt models/zoo.py); the keys each method reads. Prefixes are
  key/value tokens prepended inside the attention of the blocks listed in layers (prefix tuning).
type: object
required: [pool_size, length, layers]
properties:
  pool_size:
    description: "prompts in the pool (L2P 30; DualPrompt: e-prompts, one per task; CODA-Prompt: components, 100)"
    type: integer
    minimum: 1
  length: {type: integer, minimum: 2, multipleOf: 2, description: "tokens of a prompt, half keys and half values (L2P 20, DualPrompt 20, CODA-Prompt 8)"}
  layers:
    description: "the prompted blocks (L2P [0], DualPrompt's e-prompts [2, 3, 4], CODA-Prompt [0, 1, 2, 3, 4])"
    type: array
    items: {type: integer, minimum: 0}
    minItems: 1
    uniqueItems: true
  top_k: {type: integer, minimum: 1, description: "L2P: prompts chosen per image (5)"}
  key_loss:
    description: >-
      L2P: official: the key-matching loss as the official code computes it, (1 - cos[:, idx]).sum() over
      a [batch, batch, top_k] index (every image against the keys chosen by every image of the batch);
      per_image: each image against its own chosen keys
    enum: [official, per_image]
  g_length: {type: integer, minimum: 2, multipleOf: 2, description: "DualPrompt: tokens of the shared g-prompt (6)"}
  g_layers:
    description: "DualPrompt: the blocks of the g-prompt ([0, 1])"
    type: array
    items: {type: integer, minimum: 0}
    uniqueItems: true
  ortho_mu: {type: number, minimum: 0, description: "CODA-Prompt: weight of the orthogonality penalty (0.0 in the official scripts)"}
additionalProperties: false
""")

# what each method's pool reads beyond pool_size, length and layers (each method's `prompt` must give them)
OWN_KEYS = {"l2p": ("top_k", "key_loss"), "dualprompt": ("g_length", "g_layers"), "coda-prompt": ("ortho_mu",)}
# the methods whose pool needs a prompt per task, and why
PER_TASK = {"dualprompt": "DualPrompt trains e-prompt t for task t",
            "coda-prompt": "CODA-Prompt gives each task pool_size // num_tasks components"}


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {f"prompt.{k}": spec["prompt"].get(k) for k in ("layers", "g_layers")})
    if spec["method"] in PER_TASK and spec["prompt"]["pool_size"] < spec["num_tasks"]:
        raise ConfigError(f"{key}.prompt.pool_size: {PER_TASK[spec['method']]}, so the pool needs at least "
                          f"num_tasks ({spec['num_tasks']}) prompts, not {spec['prompt']['pool_size']}")


def _method(name: str, title: str, description: str) -> Method:
    prompt = copy.deepcopy(PROMPT)
    prompt["required"] = prompt["required"] + list(OWN_KEYS[name])
    return Method(name=name, protocol="cil", title=title, description=description,
                  model="ifcl.models.vit_prompt:build", settings={"prompt": prompt}, required=("prompt",),
                  model_keys=("num_tasks", "prompt"), check=check, group="prompts")


METHODS = (
    _method("l2p", "L2P++", "a frozen ViT with a pool of key/value prefixes, the top-k chosen by each image's query "
                            "(settings under prompt; GT-RIPL/CODA-Prompt)"),
    _method("dualprompt", "DualPrompt", "task-shared g-prompts and one e-prompt per task, chosen by the image's "
                                        "query at test time (settings under prompt; GT-RIPL/CODA-Prompt)"),
    _method("coda-prompt", "CODA-Prompt", "a prompt assembled from components weighted by the attended query, "
                                          "each task adding its own (settings under prompt; GT-RIPL/CODA-Prompt)"),
)
