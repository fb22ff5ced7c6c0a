"""Every pointer in the project's documents resolves inside the repository: markdown links to files (and their
#anchors), and the files, folders and tests named in backticks (`tests/test_x.py::test_name`)."""
import re
from pathlib import Path

import pytest

from conftest import REPO

DOCUMENTS = ["README.md", "BENCHMARKS.md", "config/README.md", *sorted(str(p.relative_to(REPO))
                                                                     for p in (REPO / "docs").glob("*.md"))]
# a repository path in backticks: starts with one of the top-level folders or files
TOP = ("src/", "tests/", "docs/", "config/", "workflow/", "scripts/", "profiles/", "envs/", ".ci/")
LINK = re.compile(r"\]\(([^)#\s]+)?(?:#([^)\s]+))?\)")
TICKED = re.compile(r"`((?:" + "|".join(re.escape(t) for t in TOP) + r")[^`\s]*)`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_link_and_named_path_resolves(document):
    path = REPO / document
    text = path.read_text()
    broken = []
    for target, anchor in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"link to {target}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"link to {target}#{anchor} (no such heading)")
    for ticked in TICKED.findall(text):
        name, _, test = ticked.partition("::")
        name = name.rstrip(".,:;)")
        if any(c in name for c in "*{}<>"):  # a pattern (config/experiments/*.yaml, task<t>/...), not one path
            continue
        file = REPO / name
        if not file.exists():
            broken.append(f"`{ticked}`")
        elif test and f"def {test.split('[')[0]}(" not in file.read_text():
            broken.append(f"`{ticked}` (no such test)")
    assert not broken, f"{document}: " + "; ".join(broken)


CODE_POINTER = re.compile(r"\b((?:tests|docs|config|workflow|scripts|profiles|envs)/[\w./-]*\w)(?:::(\w+))?")


def test_every_path_named_in_the_code_exists():
    """Docstrings and comments of the library, the rules and the scripts point to files of the repository."""
    broken = []
    files = [*(REPO / "src/ifcl").rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), *(REPO / "scripts").glob("*.py"),
             REPO / "Snakefile", REPO / "dvc.yaml", REPO / "pyproject.toml"]
    for file in files:
        for name, test in CODE_POINTER.findall(file.read_text()):
            if "{" in name or "<" in name or not (REPO / name).exists() and "." not in Path(name).name:
                continue  # a pattern, or a folder the pipeline makes
            if not (REPO / name).exists():
                broken.append(f"{file.relative_to(REPO)}: {name}")
            elif test and f"def {test}(" not in (REPO / name).read_text():
                broken.append(f"{file.relative_to(REPO)}: {name}::{test}")
    assert not broken, "; ".join(broken)


def test_nothing_points_outside_the_repository():
    """No notes outside the repository are cited: no `reference/...`, no DESIGN, no section signs of such notes."""
    files = [p for folder in ("src", "tests", "scripts", "workflow", "docs", "config") for p in (REPO / folder).rglob("*")
             if p.suffix in (".py", ".smk", ".md", ".yaml", ".rst") and p.name != "test_docs.py"]
    files += [REPO / name for name in ("README.md", "BENCHMARKS.md", "Snakefile", "dvc.yaml", "pyproject.toml")]
    found = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"reference/|\bDESIGN\b|§", line)]
    assert not found, found


def test_readme_tables_copies_a_sections_tables_and_check_says_when_they_differ(tmp_path):
    """`ifcl readme-tables`: the demo section takes every table of the summary, the comparison section its
    class-incremental table alone; with --check a README that differs from the summary is refused."""
    from argparse import Namespace

    from ifcl.cli import machine_line, readme_markers, readme_tables
    from ifcl.files import write_text

    summary = tmp_path / "summary.md"  # a step's file, with its recorded digest
    write_text(summary, "Intro line.\n\n### Class-incremental learning\n\n| a |\n|---|\n| 1 |\n\n"
                       "### Multi-domain task-incremental learning (MTIL, DIKI)\n\n| b |\n|---|\n| 2 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(["# x", *readme_markers("demo"), "between", *readme_markers("comparison"), ""]))

    def run(section, check=False):
        readme_tables(Namespace(summary=str(summary), readme=str(readme), section=section, check=check))

    run("demo")
    run("comparison")
    text = readme.read_text()
    demo, comparison = (text.split(readme_markers(s)[0])[1].split(readme_markers(s)[1])[0] for s in
                        ("demo", "comparison"))
    assert "| 1 |" in demo and "| 2 |" in demo and "Intro" not in demo
    assert comparison.strip() == "### Class-incremental learning\n\n| a |\n|---|\n| 1 |\n\n" + machine_line()
    run("comparison", check=True)
    write_text(summary, summary.read_text().replace("| 1 |", "| 3 |"))
    with pytest.raises(SystemExit, match="comparison tables"):
        run("comparison", check=True)


def test_readme_tables_check_compares_means_within_the_larger_std_plus_the_margin(tmp_path):
    """Another CPU gives other floats: --check accepts a mean within the larger of the two standard deviations plus
    README_MARGIN points, refuses one beyond, and any change of another cell; the machine line is not compared."""
    from ifcl.cli import README_MARGIN, machine_line, table_differences

    table = ("### Class-incremental learning\n\n| experiment | method | A_T (%) | paper |\n|---|---|---|---|\n"
             "| demo_x | inflora | {} | — |\n")
    recorded = table.format("45.60 ± 2.25") + "\n" + machine_line() + "\n"
    assert machine_line().startswith("_Recorded on ") and "torch" in machine_line()
    assert table_differences(recorded, table.format(f"{45.60 + 2.25 + README_MARGIN - 0.01:.2f} ± 1.00")) == []
    assert table_differences(recorded, table.format(f"{45.60 - 3.00 - README_MARGIN + 0.01:.2f} ± 3.00")) == []
    far = table_differences(recorded, table.format(f"{45.60 + 2.25 + README_MARGIN + 0.02:.2f} ± 1.00"))
    assert len(far) == 1 and "demo_x, A_T (%)" in far[0]
    assert table_differences(recorded, table.format("45.60 ± 2.25").replace("inflora", "seq-lora"))
    assert table_differences(recorded, table.format("45.60 ± 2.25").replace("demo_x", "demo_y"))
