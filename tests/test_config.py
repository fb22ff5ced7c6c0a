import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, only, snakemake
from ifcl.config import ConfigError, check, load_config, load_yaml, merge_includes, task_train_params
from ifcl.runtime import derive_seed


def test_check_accepts_the_tiny_and_demo_configs(tiny_config):
    check(tiny_config)
    for name in ("demo.yaml", "demo_comparison.yaml", "demo_mtil.yaml"):  # with their includes
        check(load_config(REPO / "config" / name, REPO))


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["experiments"]["tiny_seq-lora"].update(num_tasks=4), "experiments.tiny_seq-lora.num_tasks"),
    (lambda c: c["experiments"]["tiny_seq-lora"].update(dataset="nope"), "experiments.tiny_seq-lora.dataset"),
    (lambda c: c["experiments"]["tiny_seq-lora"].update(backbone="nope"), "experiments.tiny_seq-lora.backbone"),
    (lambda c: c["experiments"]["tiny_seq-lora"].update(task_overrides={3: {"epochs": 2}}),
     "experiments.tiny_seq-lora.task_overrides"),
    (lambda c: c["experiments"]["tiny_seq-lora"].update(lora_blocks=[0, 5]), "experiments.tiny_seq-lora.lora_blocks"),
    (lambda c: c["backbones"]["tiny_vit"]["pretrain"].update(dataset="nope"), "backbones.tiny_vit.pretrain.dataset"),
    (lambda c: c["backbones"]["tiny_vit"]["arch"].update(patch_size=5), "backbones.tiny_vit.arch.patch_size"),
    (lambda c: c["backbones"].update(hub={"type": "timm", "name": "vit_tiny_patch16_224",
                                          "weights": "nowhere/w.safetensors"}), "backbones.hub.weights: nowhere"),
    (lambda c: c["datasets"][c["experiments"]["tiny_seq-lora"]["dataset"]].pop("train_transform"),
     "needs train_transform"),
    (lambda c: c["datasets"][c["backbones"]["tiny_vit"]["pretrain"]["dataset"]].pop("test_transform"),
     "the pretraining of backbones.tiny_vit trains on it with its own augmentation, so it needs test_transform"),
])
def test_check_names_the_bad_key(tiny_config, edit, key):
    edit(tiny_config)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(tiny_config)


def test_diki_experiments_need_clip_backbones_and_known_datasets(tiny_config):
    diki = only(tiny_config, "tiny_diki")
    check(diki)
    diki["experiments"]["tiny_diki"]["sequence"].append("nope")
    with pytest.raises(ConfigError, match=r"experiments\.tiny_diki\.sequence\[2\]: unknown dataset 'nope'"):
        check(diki)
    both = tiny_config
    both["experiments"]["tiny_diki"]["backbone"] = "tiny_vit"
    with pytest.raises(ConfigError, match="tiny_diki.backbone: DIKI needs a CLIP backbone"):
        check(both)
    both["experiments"]["tiny_diki"]["backbone"] = "tiny_clip"
    both["experiments"]["tiny_diki"]["prefix"] = {"depth_vision": 3, "depth_text": 1, "length": 4}
    with pytest.raises(ConfigError, match="tiny_diki.prefix.depth_vision: 3 blocks, but the vision tower"):
        check(both)
    both["experiments"]["tiny_diki"]["prefix"]["depth_vision"] = 1
    both["experiments"]["tiny_seq-lora"]["backbone"] = "tiny_clip"
    with pytest.raises(ConfigError, match="tiny_seq-lora.backbone: seq-LoRA needs a ViT backbone"):
        check(both)


def test_includes_merge_by_name_and_reject_conflicts(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"datasets": {"d": {"x": 1}}, "experiments": {"e1": {"y": 1}}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"datasets": {"d": {"x": 1}}, "experiments": {"e2": {"y": 2}}}))
    merged = merge_includes({"include": ["a.yaml", "b.yaml"]}, tmp_path)
    assert merged == {"datasets": {"d": {"x": 1}}, "experiments": {"e1": {"y": 1}, "e2": {"y": 2}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"datasets": {"d": {"x": 2}}}))
    with pytest.raises(ConfigError, match="datasets.d is defined differently"):
        merge_includes({"include": ["a.yaml", "c.yaml"]}, tmp_path)
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        merge_includes({"include": ["missing.yaml"]}, tmp_path)


def test_an_include_missing_from_the_working_directory_is_read_from_the_repository(tmp_path):
    """config/demo_comparison.yaml includes config/demo.yaml: from another working directory (snakemake -d) the
    repository's file is merged; a file of that name in the working directory comes first."""
    merged = merge_includes(load_yaml(REPO / "config/demo_comparison.yaml"), tmp_path)
    assert {"demo_inflora", "demo_diki", "demo_l2p"} <= set(merged["experiments"])
    (tmp_path / "config").mkdir()
    (tmp_path / "config/demo.yaml").write_text(yaml.safe_dump({"datasets": {"mine": {"x": 1}}}))
    merged = merge_includes(load_yaml(REPO / "config/demo_comparison.yaml"), tmp_path)
    assert "mine" in merged["datasets"] and "demo_inflora" not in merged["experiments"]


def test_a_config_that_includes_itself_is_named_with_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    (tmp_path / "self.yaml").write_text("include: [self.yaml]\n")
    with pytest.raises(ConfigError, match=r"include: a.yaml includes itself \(.*a.yaml > .*b.yaml > .*a.yaml\)"):
        merge_includes({"include": ["a.yaml"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"include: self.yaml includes itself"):
        merge_includes(load_yaml(tmp_path / "self.yaml"), tmp_path)
    (tmp_path / "c.yaml").write_text("include: [d.yaml, d.yaml]\n")  # the same file twice is no cycle
    (tmp_path / "d.yaml").write_text("datasets: {x: {type: generated}}\n")
    assert merge_includes({"include": ["c.yaml"]}, tmp_path)["datasets"] == {"x": {"type": "generated"}}


def test_task_overrides_and_seeds():
    exp = {"train": {"lr": 0.1, "epochs": 3}, "task_overrides": {0: {"epochs": 5}}}
    assert task_train_params(exp, 0) == {"lr": 0.1, "epochs": 5}
    assert task_train_params(exp, 1) == {"lr": 0.1, "epochs": 3}
    assert derive_seed("a", 0, 1) == derive_seed("a", 0, 1) != derive_seed("a", 1, 0)
    assert 0 <= derive_seed("x") < 2**63


def _set(config, path, value):
    *parents, last = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize("path, value, expected", [
    ("experiments.tiny_seq-lora.method", "magic-lora", "method"),
    ("experiments.tiny_seq-lora.rank", 0, "rank"),
    ("experiments.tiny_seq-lora.num_tasks", 4, "experiments.tiny_seq-lora.num_tasks"),
    ("experiments.tiny_seq-lora.seeds", None, "seeds"),
    ("datasets.tiny_shapes.train_per_class", None, "train_per_class"),
    # a misspelled key: the closest valid name, and the config file named
    ("experiments.tiny_inflora.lam", 0.9, "experiments.tiny_inflora: Additional properties are not allowed ('lam' "
     "was unexpected) ('lam': did you mean 'lamb' or 'lame'?)"),
    ("experiments.tiny_inflora.lamb", None, "config.yaml"),
])
def test_bad_config_fails_before_any_job(tmp_path, tiny_config, path, value, expected):
    _set(tiny_config, path, value)
    proc = snakemake(tmp_path, tiny_config, "--dry-run", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert expected in out, out[-3000:]
    assert not any((tmp_path / d).exists() for d in ("data", "results", "logs"))


def test_workflow_lint_is_clean(tmp_path, tiny_config):
    proc = snakemake(tmp_path, tiny_config, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-3000:]


def test_yaml_errors_name_the_file_line_and_column(tmp_path):
    from ifcl.config import load_config

    (tmp_path / "extra.yaml").write_text("datasets:\n  mine: {type: folder,\n  other: 1\n")
    with pytest.raises(ConfigError, match=r"extra.yaml, line \d+, column \d+: not valid YAML"):
        load_config({"include": ["extra.yaml"], "datasets": {}, "backbones": {}, "experiments": {}}, tmp_path)
    # the --configfile itself (which Snakemake reads, reporting no line): `ifcl check --configfile` names it
    (tmp_path / "main.yaml").write_text("datasets:\n  a: {type: generated\n  b: [\n")
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "check", "--configfile", "main.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "ifcl check: main.yaml, line 3, column 4: not valid YAML" in proc.stderr


def folder_dataset_config(tiny_config, root, num_tasks=3):
    tiny_config["datasets"]["mine"] = {"type": "folder", "path": str(root),
                                       "split": {"rule": "random", "test_fraction": 0.2, "seed": 0},
                                       "train_transform": "random-resized-crop-flip", "test_transform": "resize"}
    tiny_config["experiments"] = {"mine": {**TINY_CONFIG["experiments"]["tiny_seq-lora"], "dataset": "mine",
                                           "num_tasks": num_tasks}}
    return tiny_config


def test_a_folder_dataset_is_checked_before_any_job(tmp_path, tiny_config):
    """A missing folder, or class folders the task count does not divide: the dry run stops, naming the key."""
    config = folder_dataset_config(tiny_config, tmp_path / "nowhere")
    proc = snakemake(tmp_path / "wd", config, "--dry-run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "datasets.mine.path: the folder" in out and "nowhere does not exist" in out, out[-3000:]
    for c in range(4):
        (tmp_path / "imgs" / f"class_{c}").mkdir(parents=True)
    config = folder_dataset_config(tiny_config, tmp_path / "imgs", num_tasks=3)
    proc = snakemake(tmp_path / "wd", config, "--dry-run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "experiments.mine.num_tasks: 3 tasks do not divide the 4 classes of dataset 'mine' (the class folders of" \
        in out, out[-3000:]
    assert not any((tmp_path / "wd" / d).exists() for d in ("data", "results", "logs"))


def test_config_readme_lists_every_key_of_the_schema():
    """config/README.md is what `ifcl config-docs` writes from the schema: every key, in the schema's words."""
    from ifcl.config import config_reference, schema_keys

    text = (REPO / "config" / "README.md").read_text()
    assert text == config_reference(), "config/README.md is out of date: run `ifcl config-docs`"
    for row in schema_keys():
        assert f"| `{row['key'].split('.', 1)[1]}` |" in text
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "config-docs", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
