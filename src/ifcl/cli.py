"""The ``ifcl`` command.

    ifcl bench demo [--cores 2] [--out results/bench/demo.json]
        Run the offline demo from scratch in a temporary working directory; report its wall time, the number of
        jobs per rule and the demo's summary table, and write them as JSON.

    ifcl bench speed [--device cpu|cuda] [--preset paper|tiny] [--out results/bench/speed-<device>.json]
        Time ifcl's InfLoRA and DIKI training and evaluation steps against official-style references (same
        function, computed as the official code does) in one run; print ms/step, images/s, peak memory, speed-ups.

    ifcl bench bf16 --configfile config/demo.yaml <DIKI experiment> [--seed 0]
        In a finished working directory: how far the run's frozen test features would move under bf16 autocast
        (ifcl computes them in float32), and what that would change in DIKI's task choice and λ.

    ifcl bench scale [--configfile config/config.yaml ...] [--out results/bench/scale.json]
        For each config, a dry run in an empty directory: its jobs, the dry run's wall time, and for each job
        grouping (job_groups none / task / run) the SLURM submissions and the longest chain of submissions that
        must run one after another.

    ifcl status [--configfile config/config.yaml] [-d DIR] [--watch SECONDS]
        Where the working directory stands: each configured run's tasks done, the running jobs (task, epoch, loss,
        images/s, ETA, log), the last failure and its log. Read from the files: local and SLURM runs alike.

    ifcl data-ready [--configfile config/config.yaml]
        Exit with a message naming the jobs if `snakemake data` would run any: the data under data/ (what data.dvc
        tracks) is complete and up to date for the config. The first command of dvc.yaml's pipeline stage.

    ifcl run show results/runs/<experiment>/seed<k>
        List the run's tasks and files with their sizes and sha256; every state file is verified as it is read.

    ifcl run model --configfile config/demo.yaml <experiment> <seed> <task>
        Load "the model after task <task>" (as ifcl.runs.load_model does in Python) and describe it.

    ifcl run compare <workdir A> <workdir B> [--run <experiment>/seed<k> ...]
        Compare two working directories byte for byte: the summary tables and every file of the named runs (all
        runs of A by default); exit status 1 if any differs or is missing.

    ifcl run predict --configfile config/demo.yaml <experiment> <seed> <task> <image, folder or list file>...
            [--out predictions.csv] [--batch-size N] [--dataset <DIKI dataset>]
        The model after task <task> on one's own images, through the experiment's test-time transform: per image
        the predicted class, its softmax probability and, for DIKI, the chosen task and λ (ifcl.predict).

    ifcl run evaluate --configfile config/demo.yaml <experiment> <seed> <task> [--manifest <csv>]
        The run's evaluation step after task <task> again: on its test set (beside the figures of its eval.json,
        which it reproduces), or on the images of a manifest (path,label,class_name).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .files import read_text, write_json
from .layout import SUMMARY


def job_stats(log: str) -> dict[str, int]:
    """The first "Job stats" table of a Snakemake log: jobs per rule."""
    jobs: dict[str, int] = {}
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Job stats:"), None)
    if start is None:
        return jobs
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def show_status(args) -> None:
    from .config import ConfigError, load_config
    from .status import status_report

    try:
        config = load_config(args.configfile)
    except (ConfigError, OSError) as e:
        sys.exit(f"ifcl status: {e}")
    while True:
        print(status_report(config, args.directory), flush=True)
        if not args.watch:
            return
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return
        print()


def data_ready(configfile: str, directory: str = ".") -> None:
    """Exit with a message if `snakemake data` would run a job: the pipeline stage of dvc.yaml depends on data/
    (data.dvc) and must not write into it, so the data is prepared before, by `snakemake data` and `dvc add data`,
    or pulled (`dvc pull data.dvc`)."""
    cmd = [sys.executable, "-m", "snakemake", "data", "--dry-run", "--quiet", "rules", "--configfile", configfile]
    proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr + f"\nifcl data-ready: `snakemake data --dry-run` failed (above)")
    jobs = {rule: n for rule, n in job_stats(proc.stdout + proc.stderr).items() if rule != "data"}
    if jobs:
        listed = ", ".join(f"{rule} x{n}" for rule, n in sorted(jobs.items()))
        sys.exit(f"ifcl data-ready: data/ is not complete for {configfile}: `snakemake data` would run {listed}.\n"
                 f"Prepare it first, then record it: `snakemake data --cores all --configfile {configfile}` and "
                 f"`dvc add data` (or fetch a lab's copy: `dvc pull data.dvc`), then run `dvc repro` again.")
    print(f"data/ is complete for {configfile}")


def bench_demo(args) -> dict:
    snakefile = Path(args.snakefile).resolve()
    if not snakefile.is_file():
        sys.exit(f"ifcl bench demo: no Snakefile at {snakefile} (run from the repository root or pass --snakefile)")
    configfile = Path(args.configfile).resolve()
    with tempfile.TemporaryDirectory(prefix="ifcl-bench-") as tmp:
        if args.keep:
            tmp = str(Path(args.keep).resolve())
        cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", tmp, "--cores", str(args.cores),
               "--configfile", str(configfile)]
        print("running:", " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"the demo failed:\n{proc.stderr[-6000:]}")
        jobs = job_stats(proc.stderr + proc.stdout)
        summary = read_text(Path(tmp, SUMMARY, "summary.md"))
    report = {
        "wall_seconds": round(wall, 1),
        "cores": args.cores,
        "config": str(Path(args.configfile)),
        "jobs_per_rule": dict(sorted(jobs.items())),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "summary_md": summary,
    }
    print(f"demo wall time: {wall:.1f} s on {args.cores} cores ({sum(jobs.values())} jobs)")
    print(summary)
    return report


def bench_check(args) -> dict:
    """The check every workflow start runs (ifcl.integrity), on a fabricated working directory with the paper
    configs' number of run files: ``--files`` files under results/runs, ``--text`` of them text files (with their
    digests) and the rest state files of ``--state-kb`` KB, each with a Snakemake record of 3 inputs."""
    import base64

    import torch

    from .files import file_sha256, write_text
    from .integrity import check_workdir
    from .state import save_state

    with tempfile.TemporaryDirectory(prefix="ifcl-bench-check-") as tmp:
        root = Path(tmp)
        paths = []
        for i in range(args.files):
            path = root / f"results/runs/exp{i // 500}/seed0/task{i % 500}/file{i}"
            if i < args.text:
                write_text(path.with_suffix(".json"), json.dumps({"i": i}) + "\n")
                paths.append(path.with_suffix(".json"))
            else:
                save_state(path.with_suffix(".safetensors"), {"w": torch.full((args.state_kb * 256,), float(i))}, {})
                paths.append(path.with_suffix(".safetensors"))
        meta = root / ".snakemake/metadata"
        meta.mkdir(parents=True)
        for i, path in enumerate(paths):
            inputs = {str(paths[j].relative_to(root)): "sha256:" + file_sha256(paths[j])
                      for j in (i - 1, i - 2, i - 3) if j >= 0}
            key = base64.urlsafe_b64encode(str(path.relative_to(root)).encode()).decode()
            (meta / key).write_text(json.dumps({"input_checksums": inputs}))
        report = {"files": args.files, "text_files": args.text, "state_kb": args.state_kb, "records": len(paths)}
        for label in ("first (every file read)", "next (nothing changed)"):
            start = time.perf_counter()
            result = check_workdir(root)
            seconds = time.perf_counter() - start
            assert not result.moved and not result.stale
            print(f"{label}: {seconds:.2f} s, {result.checked} files checked, {result.hashed} file reads")
            report[label.split()[0]] = {"seconds": round(seconds, 3), "read": result.hashed}
    return report


# the README's sections of tables: the demo's (config/demo.yaml), every table; the comparison demo's
# (config/demo_comparison.yaml, run after it), the class-incremental table alone; the MTIL comparison demo's
# (config/demo_mtil.yaml), the MTIL table alone
README_SECTIONS = {"demo": None, "comparison": "cil", "mtil": "mtil"}


def readme_markers(section: str) -> tuple[str, str]:
    """The README lines between which a section's tables stand."""
    return (f"<!-- {section} summary: written by `ifcl readme-tables`, from results/summary/summary.md -->",
            f"<!-- end of {section} summary -->")


# --check: a mean of the README and the fresh run's may differ by the larger of the two standard deviations plus
# this many points (float kernels differ between CPUs, and a few images more or less change an accuracy)
README_MARGIN = 2.0
_MEAN_STD = re.compile(r"(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")


def machine_line() -> str:
    """The line under a README section's tables naming the machine and software they came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"_Recorded on {cpu} ({platform.machine()}), torch {torch.__version__}._"


def table_differences(recorded: str, fresh: str, margin: float = README_MARGIN) -> list[str]:
    """Where the tables of ``fresh`` differ from those of ``recorded`` beyond tolerance: a "mean ± std" cell by
    more than the larger std plus ``margin``, any other cell at all, a row or table missing or added. Lines that
    are not table rows (the machine line) are not compared."""
    def rows(text):
        out, headers, heading = {}, {}, ""
        for line in text.splitlines():
            if line.startswith("### "):
                heading = line[4:]
            elif line.startswith("|") and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if heading not in headers:
                    headers[heading] = cells
                else:
                    out[(heading, cells[0])] = cells
        return out, headers

    (old, headers), (new, _) = rows(recorded), rows(fresh)
    found = [f"{h}: row {r!r} is only in {'the README' if (h, r) in old else 'the fresh run'}"
             for h, r in sorted(old.keys() ^ new.keys())]
    for key in sorted(old.keys() & new.keys()):
        header = headers[key[0]]
        if len(old[key]) != len(new[key]):
            found.append(f"{key[0]}: row {key[1]!r} has other columns")
            continue
        for column, a, b in zip(header, old[key], new[key]):
            ma, mb = _MEAN_STD.fullmatch(a), _MEAN_STD.fullmatch(b)
            if ma and mb:
                gap, allowed = abs(float(ma[1]) - float(mb[1])), max(float(ma[2]), float(mb[2])) + margin
                if gap > allowed:
                    found.append(f"{key[0]}, {key[1]}, {column}: {a} against {b} (differ by {gap:.2f}, more "
                                 f"than {allowed:.2f})")
            elif a != b:
                found.append(f"{key[0]}, {key[1]}, {column}: {a!r} against {b!r}")
    return found


def readme_tables(args) -> None:
    """Copy the tables of a summary.md between the README's markers of a section (the demo's, the comparison
    demo's or the MTIL comparison demo's), with the machine they came from; with --check, only say whether the README's tables agree with the
    summary's within tolerance (:func:`table_differences`: float kernels differ between CPUs)."""
    begin, end = readme_markers(args.section)
    body = read_text(args.summary).split("\n\n", 1)[1].strip()  # without the introduction line
    protocol = README_SECTIONS[args.section]
    if protocol is not None:  # from that protocol's heading to the next table's
        from .results import TITLES

        heading = f"### {TITLES[protocol]}\n"
        if heading not in body:
            sys.exit(f"ifcl readme-tables: {args.summary} has no table {heading.strip()!r}")
        body = body.split(heading, 1)[1].split("\n### ", 1)[0]
        body = (heading + body).strip()
    readme = Path(args.readme).read_text()
    if readme.count(begin) != 1 or readme.count(end) != 1:
        sys.exit(f"ifcl readme-tables: {args.readme} needs one line {begin!r} and one {end!r}")
    before, rest = readme.split(begin)
    current, after = rest.split(end)
    if args.check:
        differences = table_differences(current, body)
        if differences:
            sys.exit(f"ifcl readme-tables: the {args.section} tables in {args.readme} differ from {args.summary} "
                     f"beyond tolerance (the larger std + {README_MARGIN} points):\n  " + "\n  ".join(differences))
        print(f"{args.readme} holds the {args.section} tables of {args.summary} (within tolerance)")
        return
    new = f"{before}{begin}\n\n{body}\n\n{machine_line()}\n\n{end}{after}"
    if new != readme:
        Path(args.readme).write_text(new)
        print(f"written the tables of {args.summary} into the {args.section} section of {args.readme}")


def run_show(args) -> None:
    from .runs import describe_run

    rows = describe_run(args.run)
    width = max((len(r["file"]) for r in rows), default=0)
    for r in rows:
        task = "-" if r["task"] is None else str(r["task"])
        print(f"{task:>4}  {r['file']:<{width}}  {r['bytes']:>10}  {r['sha256']}  {r['kind']}")
    print(f"{len(rows)} files; every one matches its recorded digest")


def check(args) -> None:
    from .config import ConfigError, load_config
    from .integrity import check_workdir

    if args.configfile:
        try:
            load_config(args.configfile, args.directory)
        except ConfigError as e:
            sys.exit(f"ifcl check: {args.configfile}: {e}" if not str(e).startswith(args.configfile) else f"ifcl check: {e}")
        print(f"{args.configfile}: a valid configuration")
    report = check_workdir(args.directory, dry_run=args.dry_run)
    for line in report.lines(args.dry_run):
        print(line)
    found = len(report.moved) + len(report.stale)
    print(f"{report.checked} files checked ({report.hashed} read); {found or 'nothing'} to regenerate")
    if found and args.dry_run:
        sys.exit(1)


def run_model(args) -> None:
    from .runs import load_model

    model = load_model(args.configfile, args.experiment, args.seed, args.task)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    print(f"{args.experiment} seed {args.seed} after task {args.task}: {type(model).__name__}, {n:,} tensor elements")


def run_compare(args) -> None:
    from .runs import compare_workdirs

    rows = compare_workdirs(args.a, args.b, args.run)
    width = max((len(path) for path, _ in rows), default=0)
    for path, status in rows:
        print(f"{path:<{width}}  {status}")
    different = [path for path, status in rows if status != "identical"]
    print(f"{len(rows)} files compared; {len(different) or 'none'} differ")
    if different:
        sys.exit(1)


def run_predict(args) -> None:
    from .predict import predict, prediction_summary, write_predictions

    rows = predict(args.configfile, args.experiment, args.seed, args.task, args.images, args.batch_size, args.dataset)
    write_predictions(args.out, rows)
    print("\n".join(prediction_summary(rows) + [f"written {args.out}"]))


def run_evaluate(args) -> None:
    from .predict import evaluate, evaluation_lines

    result, recorded, evaluated = evaluate(args.configfile, args.experiment, args.seed, args.task, args.manifest)
    print(f"{args.experiment} seed {args.seed} after task {args.task}:")
    print("\n".join(evaluation_lines(result, recorded, evaluated)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ifcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    demo = bench_sub.add_parser("demo", help="wall time of the whole offline demo, from scratch")
    demo.add_argument("--cores", type=int, default=2)
    demo.add_argument("--snakefile", default="Snakefile")
    demo.add_argument("--configfile", default="config/demo.yaml")
    demo.add_argument("--out", default="results/bench/demo.json")
    demo.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    speed = bench_sub.add_parser("speed", help="training/evaluation steps against official-style references")
    speed.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    speed.add_argument("--preset", default="paper", choices=["paper", "tiny"],
                       help="paper: ViT-B/16 and CLIP ViT-B/16 shapes; tiny: small sizes (tests)")
    speed.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    speed.add_argument("--repeats", type=int, default=3, help="timed steps per case (the median is reported)")
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--case", action="append", help="only this case (repeatable)")
    speed.add_argument("--out", default=None, help="JSON report (default: results/bench/speed-<device>.json)")
    bf16 = bench_sub.add_parser("bf16", help="a DIKI run's frozen features under bf16 against float32")
    bf16.add_argument("--configfile", default="config/config.yaml")
    bf16.add_argument("experiment")
    bf16.add_argument("--seed", type=int, default=0)
    check_cmd = sub.add_parser("check", help="move damaged result files aside and mark stale ones for re-running "
                               "(what the workflow does at every start)")
    check_cmd.add_argument("-d", "--directory", default=".", help="the pipeline's working directory (default: .)")
    check_cmd.add_argument("-n", "--dry-run", action="store_true", help="only report (exit status 1 if anything "
                           "would be regenerated)")
    check_cmd.add_argument("--configfile", help="also check this config (YAML syntax with its line, the schema, "
                           "the cross-checks) as the workflow would")
    cdocs = sub.add_parser("config-docs", help="write config/README.md, every config key, from the schema")
    cdocs.add_argument("--out", default="config/README.md")
    cdocs.add_argument("--check", action="store_true", help="only check (exit status 1 if it differs)")
    tables = sub.add_parser("readme-tables", help="copy a summary's tables into a section of the README")
    tables.add_argument("summary", nargs="?", default="results/summary/summary.md")
    tables.add_argument("--section", choices=README_SECTIONS, default="demo",
                        help="the demo's tables (default), the comparison demo's or the MTIL comparison demo's")
    tables.add_argument("--readme", default="README.md")
    tables.add_argument("--check", action="store_true", help="only check that the README's tables agree with the "
                        "summary's within tolerance (exit status 1 if not)")
    status = sub.add_parser("status", help="runs, tasks done, running jobs with epoch and ETA, the last failure")
    status.add_argument("--configfile", default="config/config.yaml")
    status.add_argument("-d", "--directory", default=".", help="the pipeline's working directory (default: .)")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS until Ctrl-C")
    ready = sub.add_parser("data-ready", help="exit 1 if `snakemake data` would run a job (data/ incomplete)")
    ready.add_argument("--configfile", default="config/config.yaml")
    ready.add_argument("-d", "--directory", default=".", help="the pipeline's working directory (default: .)")
    run = sub.add_parser("run", help="inspect a run: its task states, and the model after task k")
    scale = bench_sub.add_parser("scale", help="jobs, SLURM submissions and their longest chain, from dry runs")
    scale.add_argument("--configfile", nargs="+", default=["config/config.yaml"])
    scale.add_argument("--snakefile", default="Snakefile")
    scale.add_argument("--out", default="results/bench/scale.json")
    bcheck = bench_sub.add_parser("check", help="the start-of-workflow file check on a fabricated working directory")
    bcheck.add_argument("--files", type=int, default=3526, help="run files (default: the fifteen paper configs')")
    bcheck.add_argument("--text", type=int, default=1536, help="of which text files (the paper configs': 1536)")
    bcheck.add_argument("--state-kb", type=int, default=64, help="size of each state file in KB")
    run_sub = run.add_subparsers(dest="what", required=True)
    show = run_sub.add_parser("show", help="tasks and files of a run, with sha256")
    show.add_argument("run", help="results/runs/<experiment>/seed<k>")
    model = run_sub.add_parser("model", help="load the model after a task")
    model.add_argument("--configfile", default="config/config.yaml")
    model.add_argument("experiment")
    model.add_argument("seed", type=int)
    model.add_argument("task", type=int)
    compare = run_sub.add_parser("compare", help="two working directories' results, byte for byte")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--run", action="append", help="<experiment>/seed<k> (repeatable; default: every run of A)")
    predict = run_sub.add_parser("predict", help="the model after a task on one's own images, as a CSV")
    evaluate = run_sub.add_parser("evaluate", help="the run's evaluation after a task, again (or on a manifest)")
    for command in (predict, evaluate):
        command.add_argument("--configfile", default="config/config.yaml")
        command.add_argument("experiment")
        command.add_argument("seed", type=int)
        command.add_argument("task", type=int)
    predict.add_argument("images", nargs="+", help="image files, folders (searched recursively), files listing paths")
    predict.add_argument("--out", default="predictions.csv")
    predict.add_argument("--batch-size", type=int, help="default: the experiment's eval_batch_size")
    predict.add_argument("--dataset", help="DIKI: classify among this dataset's classes (default: the chosen task's)")
    evaluate.add_argument("--manifest", help="a CSV path,label,class_name (default: the run's test set)")
    args = parser.parse_args(argv)
    if args.command == "check":
        check(args)
    elif args.command == "status":
        show_status(args)
    elif args.command == "data-ready":
        data_ready(args.configfile, args.directory)
    elif args.command == "config-docs":
        from .config import config_reference

        text = config_reference()
        if args.check:
            if not Path(args.out).is_file() or Path(args.out).read_text() != text:
                sys.exit(f"ifcl config-docs: {args.out} does not match the schema; run `ifcl config-docs`")
            print(f"{args.out} matches the schema")
        else:
            Path(args.out).write_text(text)
            print(f"written {args.out}")
    elif args.command == "readme-tables":
        readme_tables(args)
    elif args.command == "run":
        from .config import ConfigError
        from .data.manifest import DatasetError
        from .files import FileCheckError
        from .state import StateError

        try:
            {"show": run_show, "model": run_model, "compare": run_compare, "predict": run_predict,
             "evaluate": run_evaluate}[args.what](args)
        except (StateError, FileCheckError, FileNotFoundError, KeyError, ConfigError, DatasetError) as e:
            sys.exit(f"ifcl run {args.what}: {e}")
    elif args.command == "bench" and args.what == "speed":
        from .benchmark import format_report, run_benchmark

        report = run_benchmark(args.preset, args.device, args.threads, args.warmup, args.repeats, args.case)
        out = args.out or f"results/bench/speed-{args.device.split(':')[0]}.json"
        write_json(out, report)
        print(format_report(report))
        print(f"written {out}")
    elif args.command == "bench" and args.what == "bf16":
        from .benchmark import bf16_feature_drift

        print("| dataset | images | max abs difference | min cosine | task choices changed | max λ difference |")
        print("|---|---|---|---|---|---|")
        for r in bf16_feature_drift(args.configfile, args.experiment, args.seed):
            print(f"| {r['dataset']} | {r['images']} | {r['max_abs_difference']:.2e} | {r['min_cosine']:.6f} | "
                  f"{r['task_choices_changed']} | {r['max_lambda_difference']:.2e} |")
    elif args.command == "bench" and args.what == "scale":
        from .plan import format_scale, scale_report

        rules = Path(args.snakefile).resolve().parent / "workflow/rules"
        rows = scale_report(args.configfile, args.snakefile, str(rules))
        print(format_scale(rows))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    elif args.command == "bench" and args.what == "check":
        bench_check(args)
    elif args.command == "bench" and args.what == "demo":
        report = bench_demo(args)
        write_json(args.out, report)
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
