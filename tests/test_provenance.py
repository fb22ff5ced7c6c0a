"""What decides a re-run: the code digest of each step (ifcl.codeversion), the plot settings (params.yaml) and the
DVC stages' dependencies."""
import pytest
import yaml

from conftest import REPO
from ifcl.codeversion import code_version, modules_used
from ifcl.plots import DEFAULT_SETTINGS, load_settings


def make_package(root):
    src = root / "src"
    files = {
        "ifcl/__init__.py": "",
        "ifcl/a.py": "from . import b\nfrom .sub.c import thing\n",
        "ifcl/b.py": "import os\n",
        "ifcl/sub/__init__.py": "",
        "ifcl/sub/c.py": "def thing():\n    from ..d import helper\n    return helper\n",
        "ifcl/d.py": "helper = 1\n",
        "ifcl/unused.py": "x = 1\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    script = root / "step.py"
    script.write_text("with open('log'):\n    from ifcl.a import something\n")
    return src, script


def test_modules_used_follows_absolute_relative_and_lazy_imports(tmp_path):
    src, script = make_package(tmp_path)
    used = {p.relative_to(src).as_posix() for p in modules_used(script, src)}
    assert used == {"ifcl/__init__.py", "ifcl/a.py", "ifcl/b.py", "ifcl/sub/__init__.py", "ifcl/sub/c.py", "ifcl/d.py"}


def test_the_digest_changes_with_the_code_a_step_runs_and_only_with_it(tmp_path):
    src, script = make_package(tmp_path)
    digest = lambda: (code_version.cache_clear(), code_version(script, src))[1]
    first = digest()
    (src / "ifcl/unused.py").write_text("x = 2\n")
    assert digest() == first
    (src / "ifcl/d.py").write_text("helper = 2\n")  # imported inside a function, two packages away
    second = digest()
    assert second != first
    script.write_text(script.read_text() + "print('done')\n")
    assert digest() not in (first, second)


def test_comments_docstrings_and_layout_change_no_digest_while_code_does(tmp_path):
    """The digest is over the parsed code: a user who updates ifcl for a comment or docstring fix keeps every
    result; a changed constant, name or statement re-runs the steps that import it."""
    src, script = make_package(tmp_path)
    digest = lambda: (code_version.cache_clear(), code_version(script, src))[1]
    (src / "ifcl/d.py").write_text('"""Helpers."""\nhelper = 1\n\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    first = digest()
    (src / "ifcl/d.py").write_text('"""Helpers, documented differently."""\n# a comment\nhelper = 1  # one\n\n'
                                  'def f(x):  # no docstring now\n    return 2*x\n')
    assert digest() == first
    (src / "ifcl/d.py").write_text('"""Helpers."""\nhelper = 1\n\n\ndef f(x):\n    """Twice x."""\n    return 3 * x\n')
    assert digest() != first
    (src / "ifcl/d.py").write_text('"""Helpers."""\nhelper = 1\n\n\ndef f(y):\n    """Twice x."""\n    return 2 * y\n')
    assert digest() != first


INFLORA_MODULES = {"methods/inflora.py", "methods/classifier_alignment.py", "models/vit_lora.py", "steps/inflora.py",
                   "steps/pretrain_vit.py"}
DIKI_MODULES = {"methods/diki.py", "models/clip_prefix.py", "models/diki.py", "steps/diki.py", "steps/pretrain_clip.py"}
DATA_BY_TYPE = {"data/generated.py", "data/folder.py", "data/benchmarks.py", "data/mtil.py", "data/prepare.py"}


def rule_scripts(rule_file: str) -> set[str]:
    text = (REPO / "workflow/rules" / rule_file).read_text()
    return {block.split('"../../scripts/')[1].split(".py")[0] for block in text.split("\nrule ")[1:]
            if '"../../scripts/' in block}


def used(script: str) -> set[str]:
    src = REPO / "src" / "ifcl"
    return {p.relative_to(src).as_posix() for p in modules_used(REPO / "scripts" / f"{script}.py", REPO / "src")}


def test_no_diki_step_runs_inflora_code_and_no_inflora_step_runs_diki_code():
    """An edit to one method's code re-runs that method's steps only (and the task split none of them)."""
    diki = rule_scripts("diki.smk") | rule_scripts("mtil.smk") | {"pretrain_clip"}
    inflora = rule_scripts("tasks.smk") | {"pretrain_backbone"}
    assert {"train_prefix", "gaussian", "evaluate_diki", "frozen_features", "pretrain_clip"} <= diki
    assert {"reduction", "train_task", "memory", "class_stats", "align", "evaluate_task"} <= inflora
    for script in diki:
        assert not used(script) & INFLORA_MODULES, script
        assert "steps/diki.py" in used(script) or script == "pretrain_clip", script
    for script in inflora - {"split_tasks"}:
        assert not used(script) & DIKI_MODULES, script
        assert "steps/inflora.py" in used(script) or script == "pretrain_backbone", script
    assert not used("split_tasks") & (INFLORA_MODULES | DIKI_MODULES | DATA_BY_TYPE)


def test_the_state_chain_digest_of_a_job_is_its_scripts_and_its_own_methods():
    """The state chain's rules run any registered method: their script imports no method's modules, and each job's
    code parameter adds the digest of its own method's implementation (ifcl.registry.method_code), so an edit to
    the prompt methods' modules re-runs their jobs and not SD-LoRA's, and the other way round."""
    from ifcl.registry import method, method_code

    prompt_files = {"methods/prompts.py", "models/vit_prompt.py"}
    sdlora_files = {"methods/sdlora.py", "models/vit_sdlora.py"}
    for script in ("train_state", "evaluate_state"):
        assert not used(script) & (prompt_files | sdlora_files | DIKI_MODULES), script
    src = REPO / "src"

    def modules_of(name):
        m = method(name)
        files = {REPO / "src" / (m.steps.replace(".", "/") + ".py"), REPO / "src" / (m.model.split(":")[0].replace(".", "/") + ".py")}
        return {p.relative_to(src / "ifcl").as_posix() for f in files for p in [f, *modules_used(f, src)]}

    assert prompt_files <= modules_of("l2p") and not modules_of("l2p") & sdlora_files
    assert sdlora_files <= modules_of("sd-lora") and not modules_of("sd-lora") & prompt_files
    assert method_code(method("l2p"), src) == method_code(method("coda-prompt"), src) != method_code(method("sd-lora"), src)


def test_every_rule_passes_the_digest_of_its_own_script():
    rules = "".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    scripts = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
    blocks = rules.split("\nrule ")[1:]
    for block in blocks:
        if 'script:\n        "../../scripts/' in block:
            name = block.split('"../../scripts/')[1].split(".py")[0]
            # the state chain's rules run a method's modules named by the registry: method_code adds their digest
            assert f'code=code("{name}")' in block or f'code=method_code("{name}")' in block, block.split(":")[0]
    used = {block.split('"../../scripts/')[1].split(".py")[0] for block in blocks if '"../../scripts/' in block}
    assert used == set(scripts)


def test_plot_settings_defaults_errors_and_the_repository_params_file(tmp_path):
    assert load_settings(tmp_path / "absent.yaml") == DEFAULT_SETTINGS
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["figures"]
    assert set(shipped) == set(DEFAULT_SETTINGS) and load_settings(REPO / "params.yaml") == shipped
    bad = tmp_path / "params.yaml"
    bad.write_text("figures: {dpi: 0}\n")
    with pytest.raises(ValueError, match="figures.dpi"):
        load_settings(bad)
    bad.write_text("figures: {colour: red}\n")
    with pytest.raises(ValueError, match="colour"):
        load_settings(bad)
    bad.write_text("figures: {band: iqr}\n")
    with pytest.raises(ValueError, match="band"):
        load_settings(bad)


def test_the_stage_recording_snakemake_metadata_runs_after_every_stage_that_writes_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    owners = [name for name, s in stages.items() for out in s.get("outs", [])
              if (out if isinstance(out, str) else next(iter(out))) == ".snakemake/metadata"]
    assert owners == ["figures"]
    last = stages["figures"]
    for name, stage in stages.items():
        assert set(stage.get("params", [])) <= set(last["params"]), name
        for dep in stage.get("deps", []):  # its deps cover every other stage's (a file is covered by its folder)
            assert any(dep == d or dep.startswith(d + "/") for d in last["deps"]), (name, dep)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if name == "pipeline" or path == ".snakemake/metadata":
                assert opts.get("persist") is True, path  # DVC never deletes finished task states
