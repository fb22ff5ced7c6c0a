"""Configuration helpers: include merging, checks the JSON schema cannot express, per-task settings and seeds.

The schema (workflow/schemas/config.schema.yaml) checks types, enums, ranges and required keys. :func:`check`
adds the cross-references (an experiment's dataset and backbone exist, task counts divide the class counts,
task overrides name existing tasks). Both run before any job starts; errors name the offending key.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping; a syntax error names the file, line and column."""
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    return data


REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout the package is installed from (pip install -e)


def merge_includes(config: dict, root: str | Path = ".", _within: tuple[Path, ...] = ()) -> dict:
    """Return ``config`` with the files listed under ``include`` merged in. An include is a path relative to
    ``root`` (the working directory) or, when no such file is there, to the repository (:data:`REPOSITORY`), so the
    repository's configs work from any working directory (``snakemake -d``).

    Registries (datasets, backbones, experiments) are merged by name; the same name defined differently in two
    files is an error naming both. Included files may include further files; a file that includes itself, directly
    or through others, is an error naming the chain (``_within``: the files being merged around this one).
    """
    merged = copy.deepcopy({k: v for k, v in config.items() if k != "include"})
    sources = {}
    for reg in ("datasets", "backbones", "experiments"):
        for name in merged.get(reg) or {}:
            sources[(reg, name)] = "the main config"
    for rel in config.get("include") or []:
        path = next((p for p in (Path(root) / rel, REPOSITORY / rel) if p.is_file()), None)
        if path is None:
            raise ConfigError(f"include: {rel} does not exist (paths are relative to the working directory "
                              f"{Path(root).resolve()} or to the repository {REPOSITORY})")
        if path.resolve() in _within:
            chain = [str(p) for p in _within[_within.index(path.resolve()):]] + [str(path.resolve())]
            raise ConfigError(f"include: {rel} includes itself ({' > '.join(chain)})")
        other = merge_includes(load_yaml(path), root, _within + (path.resolve(),))
        for key, value in other.items():
            if key not in ("datasets", "backbones", "experiments"):
                raise ConfigError(f"{rel}: key '{key}' cannot be included (only datasets, backbones, experiments)")
            target = merged.setdefault(key, {})
            for name, spec in value.items():
                if name in target and target[name] != spec:
                    raise ConfigError(f"{key}.{name} is defined differently in {sources[(key, name)]} and in {rel}")
                target[name] = spec
                sources.setdefault((key, name), rel)
    return merged


SCHEMA = REPOSITORY / "workflow" / "schemas" / "config.schema.yaml"


def method_schema(m, defs: dict) -> dict:
    """The schema of an experiment of method ``m`` (:class:`ifcl.registry.Method`): its protocol's keys (``defs``:
    the schema's definitions) and the method's own settings, with its required keys."""
    from .protocols import PROTOCOLS

    node = copy.deepcopy(defs[PROTOCOLS[m.protocol].schema])
    node["properties"] = {**node["properties"], **m.keys(), "method": {"const": m.name}}
    node["required"] = node["required"] + [k for k in m.required() if k not in node["required"]]
    return node


def schema(path: str | Path = SCHEMA) -> dict:
    """The config schema: workflow/schemas/config.schema.yaml with its ``experiment`` definition made from the
    registered methods (:func:`ifcl.registry.methods`): ``method`` one of their names, and for each the schema
    of :func:`method_schema`."""
    from .registry import methods

    out = load_yaml(path)
    defs = out["$defs"]
    known = methods()
    defs["experiment"] = {
        "description": defs["experiment"].get("description", ""), "type": "object", "required": ["method"],
        "properties": {"method": {"enum": sorted(known)}},
        "allOf": [{"if": {"properties": {"method": {"const": name}}, "required": ["method"]},
                   "then": method_schema(m, defs)} for name, m in sorted(known.items())]}
    return out


def validate_with_defaults(config: dict, schema_path: str | Path = SCHEMA) -> None:
    """Validate ``config`` against the JSON schema (:func:`schema`), filling in its defaults (as Snakemake's
    ``validate`` does for the workflow), so that code reading a config outside Snakemake sees the same values as
    the rules."""
    import jsonschema
    from referencing import Registry, Resource

    schema_ = schema(schema_path)
    base = jsonschema.validators.validator_for(schema_)

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    validator = jsonschema.validators.extend(base, {"properties": set_defaults})(
        schema_, registry=Registry().with_resource("", Resource.from_contents(schema_)))
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"{where}: {error.message}{_did_you_mean(error)}")


def _did_you_mean(error) -> str:
    """For an unknown key, the closest keys the schema allows there."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return ""
    import difflib

    allowed = sorted((error.schema.get("properties") or {}).keys())
    hints = []
    for key in error.instance:
        if key not in allowed:
            close = sorted(difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.6))
            hints.append(f"'{key}': did you mean {' or '.join(repr(c) for c in close)}?" if close else
                         f"'{key}' is not a key here (known: {', '.join(allowed)})")
    return " (" + "; ".join(hints) + ")" if hints else ""


def load_config(source: str | Path | dict, root: str | Path = ".") -> dict:
    """A config (a file, or a mapping as Snakemake's ``--configfile`` would read it) as the workflow sees it:
    includes merged (relative to ``root``, else to the repository), schema-validated with defaults, cross-checked. ``source`` is not changed."""
    config = merge_includes(source if isinstance(source, dict) else load_yaml(source), root)
    validate_with_defaults(config)
    check(config)
    return config


def paper_configs(root: str | Path) -> dict:
    """Every paper config (``config/experiments/*.yaml`` under ``root``) in one config: the protocols that
    published numbers were measured under."""
    files = sorted(str(p.relative_to(root)) for p in (Path(root) / "config" / "experiments").glob("*.yaml"))
    return load_config({"include": files}, root)


CLIP_BACKBONES = ("open_clip", "pretrain_clip")
BENCHMARK_CLASSES = {"cifar100": 100, "imagenet-r": 200, "domainnet": 345}
MTIL_CLASSES = {"aircraft": 100, "caltech101": 100, "cifar100": 100, "dtd": 47, "eurosat": 10, "flowers": 102,
                "food": 101, "mnist": 10, "oxford_pet": 37, "stanford_cars": 196, "sun397": 397}


def folder_classes(dataset: dict) -> Path:
    """The folder whose subfolders are the classes of a ``folder`` dataset."""
    root = Path(dataset["path"])
    return root / "train" if dataset["split"]["rule"] == "subfolders" else root


def num_classes(dataset: dict) -> int | None:
    """Number of classes of a dataset spec when it is known before any image is read (generated data, benchmarks,
    a user's class folders)."""
    if dataset["type"] == "folder":
        folder = folder_classes(dataset)
        return sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else None
    if dataset["type"] == "generated":
        return sum(p["count"] for p in dataset["parts"]) if "parts" in dataset else dataset["classes"]["count"]
    if dataset["type"] == "mtil":
        return MTIL_CLASSES[dataset["name"]]
    return BENCHMARK_CLASSES.get(dataset["type"])


def _needs_transforms(datasets: dict, name: str, user: str) -> None:
    missing = [k for k in ("train_transform", "test_transform") if k not in datasets[name]]
    if missing:
        raise ConfigError(f"datasets.{name}: {user} trains on it with its own augmentation, so it needs "
                          f"{' and '.join(missing)} (the MTIL protocol ignores them and uses CLIP's preprocessing)")


def check(config: dict) -> None:
    """Cross-key checks that the schema cannot do; raise :class:`ConfigError` naming the key."""
    datasets, backbones = config["datasets"], config["backbones"]
    for name, ds in datasets.items():
        if ds["type"] == "folder":
            folder = folder_classes(ds)
            if not folder.is_dir():
                raise ConfigError(f"datasets.{name}.path: the folder {folder} does not exist (relative paths are "
                                  f"relative to the working directory, {Path.cwd()})")
            if not num_classes(ds):
                raise ConfigError(f"datasets.{name}.path: {folder} holds no class folders (expected "
                                  f"{folder}/<class name>/<image files>)")
    for name, bb in backbones.items():
        if bb.get("weights") and not Path(bb["weights"]).is_file():
            raise ConfigError(f"backbones.{name}.weights: {bb['weights']} does not exist (relative paths are relative "
                              f"to the working directory, {Path.cwd()}; leave `weights` out to fetch the hub weights)")
        if bb["type"] in ("pretrain", "pretrain_clip") and bb["pretrain"]["dataset"] not in datasets:
            raise ConfigError(
                f"backbones.{name}.pretrain.dataset: unknown dataset '{bb['pretrain']['dataset']}' "
                f"(defined: {', '.join(sorted(datasets))})"
            )
        if bb["type"] in ("pretrain", "pretrain_clip"):
            _needs_transforms(datasets, bb["pretrain"]["dataset"], f"the pretraining of backbones.{name}")
        if bb["type"] == "pretrain":
            arch = bb["arch"]
            if bb["image_size"] % arch["patch_size"]:
                raise ConfigError(f"backbones.{name}.arch.patch_size: {arch['patch_size']} does not divide image_size {bb['image_size']}")
            if arch["embed_dim"] % arch["num_heads"]:
                raise ConfigError(f"backbones.{name}.arch.num_heads: {arch['num_heads']} does not divide embed_dim {arch['embed_dim']}")
    from .registry import method_of

    for name, exp in config["experiments"].items():
        key = f"experiments.{name}"
        if "/" in name or name.startswith("."):
            raise ConfigError(f"{key}: experiment names are folder names; no '/' or leading '.'")
        if exp["backbone"] not in backbones:
            raise ConfigError(f"{key}.backbone: unknown backbone '{exp['backbone']}' (defined: {', '.join(sorted(backbones))})")
        method = method_of(exp)
        (_check_mtil if method.protocol == "mtil" else _check_cil)(key, exp, config, method.title)
        if method.check is not None:
            method.check(key, exp, config)


def _check_mtil(key: str, exp: dict, config: dict, title: str) -> None:
    """An MTIL experiment: known datasets, each once, and a CLIP backbone."""
    datasets, kind = config["datasets"], config["backbones"][exp["backbone"]]["type"]
    for i, ds in enumerate(exp["sequence"]):
        if ds not in datasets:
            raise ConfigError(f"{key}.sequence[{i}]: unknown dataset '{ds}' (defined: {', '.join(sorted(datasets))})")
    if len(set(exp["sequence"])) != len(exp["sequence"]):
        raise ConfigError(f"{key}.sequence: a dataset appears twice")
    if kind not in CLIP_BACKBONES:
        raise ConfigError(f"{key}.backbone: {title} needs a CLIP backbone (type open_clip or pretrain_clip), "
                          f"not {kind}")


def _check_cil(key: str, exp: dict, config: dict, title: str) -> None:
    """A class-incremental experiment: a ViT backbone, a known dataset whose classes the tasks divide, task
    overrides of existing tasks."""
    datasets, kind = config["datasets"], config["backbones"][exp["backbone"]]["type"]
    if kind in CLIP_BACKBONES:
        raise ConfigError(f"{key}.backbone: {title} needs a ViT backbone (type timm or pretrain), not {kind}")
    if exp["dataset"] not in datasets:
        raise ConfigError(f"{key}.dataset: unknown dataset '{exp['dataset']}' (defined: {', '.join(sorted(datasets))})")
    _needs_transforms(datasets, exp["dataset"], key)
    n = num_classes(datasets[exp["dataset"]])
    if n is not None and n % exp["num_tasks"]:
        raise ConfigError(
            f"{key}.num_tasks: {exp['num_tasks']} tasks do not divide the {n} classes of dataset '{exp['dataset']}'"
            + (f" (the class folders of {folder_classes(datasets[exp['dataset']])})"
               if datasets[exp["dataset"]]["type"] == "folder" else "")
        )
    for t in exp.get("task_overrides") or {}:
        if not isinstance(t, int) or not 0 <= t < exp["num_tasks"]:
            raise ConfigError(f"{key}.task_overrides: key {t!r} is not a task index in 0..{exp['num_tasks'] - 1}")


def check_blocks(key: str, exp: dict, config: dict, listed: dict) -> None:
    """Every block index of ``listed`` ({key under the experiment: a list of block indices, or anything else})
    exists in the experiment's backbone, where its depth is known before it is built (a backbone pretrained here)."""
    bb = config["backbones"][exp["backbone"]]
    depth = bb["arch"]["depth"] if bb["type"] == "pretrain" else None
    for where, blocks in listed.items():
        if isinstance(blocks, list) and blocks and depth is not None and max(blocks) >= depth:
            raise ConfigError(f"{key}.{where}: block {max(blocks)} does not exist (depth {depth})")


def canonical(obj):
    """The same value with every mapping's keys sorted (recursively).

    Snakemake records a job's params with sorted keys and compares them with the current ones in their own order,
    so a dict param whose keys are not sorted looks changed on every run and re-runs the whole workflow. Every
    param of the rules is therefore passed through this function (the config itself included)."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    return obj


def task_train_params(experiment: dict, task: int) -> dict:
    """The optimisation settings of one task: ``train`` updated by ``task_overrides[task]``."""
    params = dict(experiment["train"])
    params.update((experiment.get("task_overrides") or {}).get(task, {}))
    return params


# ---- the schema's keys, for people (config/README.md) and for the audit of what reads them ----

PROTOCOL_GROUPS = ("dataset", "backbone", "vit_arch", "train", "cil_experiment", "mtil_experiment")
GROUP_TITLES = {"dataset": "Datasets (`datasets.<name>`)", "backbone": "Backbones (`backbones.<name>`)",
                "vit_arch": "A pretrained ViT's sizes (`backbones.<name>.arch`, type `pretrain`)",
                "train": "Optimisation (`experiments.<name>.train`, and each entry of `task_overrides`)",
                "cil_experiment": "Class-incremental experiments (`experiments.<name>`, every class-incremental method)",
                "mtil_experiment": "MTIL experiments (`experiments.<name>`, every MTIL method)"}


def method_groups() -> dict[str, list]:
    """The registered methods by settings group (:attr:`ifcl.registry.Method.group`, default its name), in name
    order: one section of config/README.md each."""
    from .registry import methods

    groups: dict[str, list] = {}
    for name, m in sorted(methods().items()):
        groups.setdefault(m.group or name, []).append(m)
    return dict(sorted(groups.items()))


def schema_keys(schema_: dict | None = None) -> list[dict]:
    """Every key of the schema's groups, in the schema's order: ``key`` as ``group[type].key.subkey`` (``[type]``
    for keys of one dataset or backbone type; ``[]`` for the keys of a list's items), with its ``node``. A key
    whose value is another group (an experiment's ``train``) is that group's keys, listed under that group. The
    methods' own settings follow, one group per :func:`method_groups` entry (a key given by several methods of a
    group is listed once)."""
    schema_ = schema_ or schema()
    rows = []

    def walk(node, prefix):
        for name, sub in (node.get("properties") or {}).items():
            path = f"{prefix}.{name}"
            if sub == {} or "$ref" in sub or any("$ref" in s for s in sub.get("allOf", [])):
                continue  # declared in the base group, or another group's keys
            items = sub.get("items") if isinstance(sub.get("items"), dict) else {}
            if "properties" in sub:
                walk(sub, path)
            elif "properties" in items:
                walk(items, path + "[]")
            elif path not in seen:
                seen.add(path)
                rows.append({"key": path, "node": sub})
        for sub in node.get("allOf", []):
            kind = sub.get("if", {}).get("properties", {}).get("type", {})
            kind = kind.get("const") or "|".join(kind.get("enum", []))
            if kind and "then" in sub:
                walk(sub["then"], f"{prefix}[{kind}]")

    seen: set[str] = set()
    for group in PROTOCOL_GROUPS:
        walk(schema_["$defs"][group], group)
    for group, members in method_groups().items():
        for m in members:
            walk({"properties": m.keys()}, group)
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _values(node: dict) -> str:
    """The values column of config/README.md: a key's choices, or its type."""
    if "enum" in node:
        return ", ".join(f"`{v}`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_values(sub) for sub in node["oneOf"])
    kind = node.get("type", "any")
    if kind == "array" and isinstance(node.get("items"), dict) and "type" in node["items"]:
        return f"array of {node['items']['type']}"
    return _cell("/".join(kind) if isinstance(kind, list) else kind)


def config_reference(schema_: dict | None = None) -> str:
    """config/README.md: every key of the schema with its type or values, its default and its description; the
    registered methods and their own settings."""
    schema_ = schema_ or schema()
    out = ["# Configuration keys", "",
           "Every key a config file may hold, read from `workflow/schemas/config.schema.yaml` and from the methods' "
           "declarations (this file is written "
           "by `ifcl config-docs`; `tests/test_config.py` checks that it matches the schema). A config holds three "
           "registries, `datasets`, `backbones` and `experiments`, each mapping names to specs; `include:` lists "
           "further files merged in, `downloads.mirror` a mirror for the fetch rules, and `job_groups` (`run`, `task` "
           "or `none`, default `run`) how a cluster run bundles jobs into submissions (docs/running.md). Which files "
           "are configs: "
           "`config/demo.yaml` (the offline demo), `config/experiments/*.yaml` (one per paper config) and "
           "`config/config.yaml` (all of them). Errors name the key; see the README, \"Configuration errors\".", ""]
    rows = schema_keys(schema_)
    groups = method_groups()
    out += ["## Methods (`experiments.<name>.method`)", "", "| method | protocol | meaning | settings |",
            "|---|---|---|---|"]
    for group, members in groups.items():
        for m in members:
            keys = ", ".join(f"`{k}`" for k in m.keys()) or "none"
            out.append(f"| `{m.name}` | {m.protocol} | {_cell(m.description)} | {keys} |")
    out.append("")
    titles = {**GROUP_TITLES, **{g: f"Settings of {', '.join(m.name for m in members)} (`experiments.<name>`)"
                                 for g, members in groups.items()}}
    for group in PROTOCOL_GROUPS + tuple(groups):
        mine = [r for r in rows if r["key"].split(".")[0].split("[")[0] == group]
        out += [f"## {titles[group]}", "", "| key | values | default | meaning |", "|---|---|---|---|"]
        for r in mine:
            node = r["node"]
            key = r["key"].split(".", 1)[1]
            kind = r["key"].split(".")[0].partition("[")[2].rstrip("]")
            values = _values(node)
            default = f"`{json.dumps(node['default'])}`" if "default" in node else ""
            meaning = _cell(node.get("description", ""))
            if kind:
                meaning = f"(type {kind.replace('|', ', ')}) {meaning}".strip()
            out.append(f"| `{key}` | {values} | {_cell(default)} | {meaning} |")
        out.append("")
    return "\n".join(out)
