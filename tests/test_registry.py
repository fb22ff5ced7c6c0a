"""The method registry (ifcl.registry): the built-in declarations, what a declaration must say, how a broken or
duplicate one is reported, and that no module outside a method's own tests its name."""
import re
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO
from ifcl import registry
from ifcl.registry import Method, RegistryError, methods

SRC = REPO / "src" / "ifcl"


def test_the_built_in_methods_their_protocols_and_chains():
    known = {name: (m.protocol, m.chain) for name, m in methods().items()}
    assert known == {"seq-lora": ("cil", "lora"), "joint": ("cil", "lora"), "inflora": ("cil", "lora"),
                     "inflora-ca": ("cil", "lora"), "l2p": ("cil", "state"), "dualprompt": ("cil", "state"),
                     "coda-prompt": ("cil", "state"), "sd-lora": ("cil", "state"), "ranpac": ("cil", "state"),
                     "lae": ("cil", "state"), "c-lora": ("cil", "state"),
                     "slca": ("cil", "state"), "ease": ("cil", "state"),
                     "mos": ("cil", "state"), "hide-prompt": ("cil", "state"), "diki": ("mtil", "prefix"), "continual-ft": ("mtil", "finetune"), "wise-ft": ("mtil", "finetune"),
                     "lwf": ("mtil", "finetune"), "lwf-vr": ("mtil", "finetune"),
                     "icarl": ("mtil", "finetune"), "zscl": ("mtil", "finetune"),
                     "moe-adapters": ("mtil", "moe")}


@pytest.mark.parametrize("fields, message", [
    ({"protocol": "dil"}, "protocol 'dil' is not one of"),
    ({"chain": "prefix"}, "chain 'prefix' is not one of the cil protocol's"),
    ({"model": None}, "the state chain needs `model`"),
    ({"chain": "lora"}, "the lora chain needs `steps`"),
    ({"task_images": "val_transform"}, "task_images is train_transform or test_transform"),
])
def test_a_declaration_says_what_is_missing(fields, message):
    base = {"name": "mine", "protocol": "cil", "title": "mine", "description": "", "model": "pkg.model:build"}
    with pytest.raises(ValueError, match=message):
        Method(**{**base, **fields})


class FakeEntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self.load, self.dist = name, value, load, None


def entry_points_returning(*points):
    def entry_points(group=None):
        return [p for p in points] if group == registry.ENTRY_POINT_GROUP else []
    return entry_points


@pytest.fixture
def fresh_registry(monkeypatch):
    methods.cache_clear()
    yield monkeypatch
    methods.cache_clear()


def test_a_package_whose_declaration_fails_to_import_is_named(fresh_registry):
    def broken():
        raise ModuleNotFoundError("No module named 'torch_extra'")

    fresh_registry.setattr(metadata, "entry_points", entry_points_returning(
        FakeEntryPoint("mine", "my_pkg:METHOD", broken)))
    with pytest.raises(RegistryError, match=r"entry point mine = my_pkg:METHOD of group ifcl.methods: "
                                            r"ModuleNotFoundError: No module named 'torch_extra'"):
        methods()


def test_a_name_declared_twice_names_both_declarations(fresh_registry):
    clash = Method(name="l2p", protocol="cil", title="L2P", description="", model="other:build")
    fresh_registry.setattr(metadata, "entry_points", entry_points_returning(
        FakeEntryPoint("l2p-again", "other:METHOD", lambda: clash)))
    with pytest.raises(RegistryError, match=r"method 'l2p' is declared twice: by ifcl.catalog.prompts and by entry "
                                            r"point l2p-again"):
        methods()
    fresh_registry.setattr(metadata, "entry_points", entry_points_returning(
        FakeEntryPoint("odd", "other:THING", lambda: {"name": "x"})))
    methods.cache_clear()
    with pytest.raises(RegistryError, match="expected a Method or a sequence of them, got dict"):
        methods()


def own_modules(method: Method) -> set[Path]:
    """A method's own files: its declaration module, the modules of ifcl named after it (steps, math, model) and
    its model's module."""
    declared = next(p for p in (SRC / "catalog").glob("*.py")
                    if re.search(rf"[\"']{re.escape(method.name)}[\"']", p.read_text()))
    own = {declared} | {p for p in SRC.glob(f"*/{declared.stem}.py")}
    if method.model:
        own.add(SRC.parent / (method.model.split(":")[0].replace(".", "/") + ".py"))
    if method.steps != registry.STATE_STEPS:
        own.add(SRC.parent / (method.steps.replace(".", "/") + ".py"))
    return own


def test_a_method_name_is_tested_only_in_its_own_modules():
    """No string literal of a method's name outside its own modules in src/ and workflow/ (ImageNet-R's split
    rule "coda-prompt", a dataset setting, aside): every other layer asks the registry."""
    files = [p for p in [*SRC.rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), *(REPO / "scripts").glob("*.py"),
                         REPO / "Snakefile"]]
    aside = {("coda-prompt", SRC / "data" / "benchmarks.py")}
    for name, method in methods().items():
        literal = re.compile(rf"[\"']{re.escape(name)}[\"']")
        found = {p for p in files if literal.search(p.read_text())}
        outside = {p for p in found - own_modules(method) if (name, p) not in aside}
        assert not outside, f"{name} is named in {sorted(str(p.relative_to(REPO)) for p in outside)}"
    tests_of_diki = [p for p in files if re.search(r"is_diki|== *[\"']diki[\"']", p.read_text())]
    assert not tests_of_diki


def test_each_methods_training_loader_is_its_official_one():
    """The prompt methods' official trainer (GT-RIPL/CODA-Prompt trainer.py) drops the last partial batch of a
    task's training images; SD-LoRA's (LAMDA-PILOT-based), RanPAC's and InfLoRA's keep it."""
    import torch
    from torch.utils.data import TensorDataset

    from ifcl.data.loader import make_loader

    dropping = {name for name, m in methods().items() if m.drop_last}
    assert dropping == {"l2p", "dualprompt", "coda-prompt", "lae"}
    data = TensorDataset(torch.arange(20.0), torch.zeros(20))
    assert [len(x) for x, _ in make_loader(data, 8, shuffle=True, drop_last=True)] == [8, 8]
    assert [len(x) for x, _ in make_loader(data, 8, shuffle=True)] == [8, 8, 4]
