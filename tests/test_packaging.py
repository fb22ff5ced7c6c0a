"""One source of truth for dependencies: envs/ifcl.yaml installs exactly pyproject.toml's runtime dependencies."""
import pytest
import yaml

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_conda_env_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "ifcl.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == "python" + requires
