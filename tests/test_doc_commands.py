"""Every command the documents show is run by a test: the shell lines of their code blocks and the commands in
backticks that start with snakemake, dvc, ifcl, python or pytest.

- `snakemake ...` runs here as a dry run (`-n`) on the demo config (where it names a paper config or none: the
  paper configs' data cannot be fetched offline), in an empty working directory. The documented trap
  (`snakemake --cores 8 --resources gpu=4 all`: `--resources` takes the target too) must fail as documented.
- `ifcl check` and `ifcl config-docs` run here as well.
- The others (the DVC recipe, `ifcl run ...`, the benchmarks, the test and install commands) run in the tests
  named in COVERED; this test checks that each of them exists. A command in no group fails the test: a new
  documented command needs its test."""
import glob
import re
import subprocess
import sys

import pytest

from conftest import REPO

DOCUMENTS = ["README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
PROGRAMS = ("snakemake", "dvc", "ifcl", "python", "pytest", ".venv/bin/")
TRAP = "snakemake --cores 8 --resources gpu=4 all"

# command prefix -> the test that runs it
COVERED = {
    "python3 -m venv .venv && source .venv/bin/activate && pip install -e '.[test]'": ".ci/run",
    "pytest": ".ci/run",
    "pytest -m demo": "tests/test_demo.py::test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold",
    ".venv/bin/pytest -m demo": "tests/test_demo.py::test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold",
    "pytest --durations": ".ci/run",
    "ifcl bench demo": "tests/test_demo.py::test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold",
    "ifcl bench speed": "tests/test_benchmark.py::test_bench_speed_writes_a_report_with_the_ratios",
    "ifcl bench bf16": "tests/test_diki_pipeline.py::test_bench_bf16_reports_the_drift_of_a_diki_run",
    "ifcl bench check": "tests/test_integrity.py::test_bench_check_times_the_check_on_a_fabricated_tree",
    "ifcl bench scale": "tests/test_plan.py::test_bench_scale_counts_the_demo",
    "pytest -m long": "tests/test_slurm.py::test_several_runs_share_one_submission_each_job_on_a_gpu_of_its_own",
    ".venv/bin/pytest -m long": "tests/test_slurm.py::test_several_runs_share_one_submission_each_job_on_a_gpu_of_its_own",
    "ifcl readme-tables": "tests/test_demo.py::test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold",
    "ifcl status": "tests/test_status.py::test_ifcl_status_on_the_finished_tiny_run_and_its_logs_read_as_text",
    "ifcl run show": "tests/test_pipeline.py::test_the_model_after_task_k_loads_and_reproduces_its_evaluation",
    "ifcl run model": "tests/test_pipeline.py::test_the_model_after_task_k_loads_and_reproduces_its_evaluation",
    "ifcl run compare": "tests/test_integrity.py::test_ifcl_run_compare_names_what_differs",
    "ifcl run predict": "tests/test_predict.py::test_predict_on_a_folder_gives_the_evaluations_argmax",
    "ifcl run evaluate": "tests/test_predict.py::test_evaluate_gives_the_runs_eval_json",
    "ifcl.runs.load_model": "tests/test_pipeline.py::test_the_model_after_task_k_loads_and_reproduces_its_evaluation",
    "snakemake --configfile config/demo.yaml --report": "tests/test_pipeline.py::test_every_figure_and_the_report",
    "snakemake --configfile <config> --report": "tests/test_pipeline.py::test_every_figure_and_the_report",
    "dvc": "tests/test_reproducibility.py::test_pull_into_an_emptied_checkout_restores_everything_and_nothing_reruns",
    "dvc add data": "tests/test_reproducibility.py::test_dvc_repro_records_every_stage_with_metrics_and_plots",
    "dvc pull data.dvc":
        "tests/test_reproducibility.py::test_a_node_without_internet_pulls_data_dvc_and_no_fetch_or_prepare_job_runs",
    "ifcl data-ready": "tests/test_reproducibility.py::test_the_pipeline_stage_refuses_data_that_is_not_complete",
    "dvc repro": "tests/test_reproducibility.py::test_dvc_repro_records_every_stage_with_metrics_and_plots",
    "dvc plots": "tests/test_reproducibility.py::test_dvc_repro_records_every_stage_with_metrics_and_plots",
    "dvc metrics": "tests/test_reproducibility.py::test_dvc_repro_records_every_stage_with_metrics_and_plots",
    "dvc exp": "tests/test_reproducibility.py::test_dvc_exp_run_keeps_results_that_dvc_lock_records_older",
    "python -m ifcl.dvclock": "tests/test_reproducibility.py::test_dvc_exp_run_after_a_plain_snakemake_run_keeps_every_result",
}


def documented_commands() -> list[str]:
    found = set()
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        for line in text.splitlines():
            if line.startswith("    ") and line.strip().startswith(PROGRAMS):
                found.add(line.strip().split("  #")[0].split("  (")[0].strip())
        for ticked in re.findall(r"`([^`]+)`", text):
            ticked = " ".join(ticked.split())
            if ticked.startswith(PROGRAMS) and " " in ticked or ticked in ("dvc repro", "snakemake"):
                found.add(ticked)
    return sorted(found)


def kind(command: str) -> str:
    if command == TRAP:
        return "trap"
    if command.startswith("snakemake") and "--report" not in command:
        return "dry-run"
    if command.startswith("ifcl check") or command.startswith("ifcl config-docs"):
        return "run"
    return "covered"


def covering_test(command: str) -> str | None:
    prefixes = [p for p in COVERED if command.startswith(p)]
    return COVERED[max(prefixes, key=len)] if prefixes else None


def test_the_documents_show_commands_and_every_one_has_its_test():
    commands = documented_commands()
    assert TRAP in commands and "snakemake all --cores 8 --resources gpu=4" in commands
    missing = [c for c in commands if kind(c) == "covered" and covering_test(c) is None]
    assert not missing, f"documented commands that no test runs: {missing}"
    for command in commands:
        test = covering_test(command) if kind(command) == "covered" else None
        if test is None:
            continue
        path, _, name = test.partition("::")
        assert (REPO / path).exists(), test
        assert not name or f"def {name}(" in (REPO / path).read_text(), f"{command}: no test {test}"


def snakemake_args(command: str) -> list[str]:
    """The command's arguments with the demo config in place of any config, as a dry run."""
    args = [str(REPO / a) if a.startswith("profiles/") else a for a in command.split()[1:]]
    if "--configfile" in args:
        i = args.index("--configfile")
        del args[i:i + 2]
    return [*args, "--configfile", str(REPO / "config/demo.yaml"),
            *([] if "-n" in args or "--unlock" in args else ["-n"])]


def snakemake_in_process(args: list[str]) -> tuple[int | str, str]:
    """Snakemake's command line in this process (a dry run takes about 0.5 s here, against 5 s in a new one)."""
    import contextlib
    import io

    from snakemake.cli import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001  (what the command line would print as a traceback)
            code = f"{type(e).__name__}: {e}"
    return code, out.getvalue()


@pytest.mark.parametrize("command", [c for c in documented_commands() if kind(c) in ("dry-run", "trap", "run")])
def test_each_documented_command_runs(command, tmp_path, caplog):
    if command.startswith("ifcl"):
        args = command.replace("<file>", str(REPO / "config/demo.yaml")).split()[1:]
        if args[0] == "config-docs":
            args.append("--check")
        proc = subprocess.run([sys.executable, "-m", "ifcl.cli", *args], capture_output=True, text=True,
                              cwd=REPO if args[0] == "config-docs" else tmp_path)
        code, out = proc.returncode, proc.stdout + proc.stderr
    else:
        code, out = snakemake_in_process(["-s", str(REPO / "Snakefile"), "-d", str(tmp_path), *snakemake_args(command)])
    if kind(command) == "trap":  # what the documents warn of
        assert code != 0 and "dictionary update sequence" in str(code) + out + caplog.text, out[-2000:]
    else:
        assert code == 0, f"{code}\n{out[-3000:]}"
