"""The working directory checked by content before any job is planned (``ifcl check``; the workflow runs it at
every start, before Snakemake compares outputs with inputs).

1. **Damaged files are moved aside.** Every file that carries a digest is checked against it: state files
   (``.safetensors`` written by :mod:`ifcl.state`, whose header holds the digest of their tensors) and text files
   with a ``<file>.sha256`` beside them (:mod:`ifcl.files`). Text files an ifcl step writes (JSON and CSV under
   ``results/``, manifests under ``data/prepared/``, the records under ``data/raw/`` and ``data/weights/``) must
   have one. A file that fails is moved to ``quarantine/<time>/<its path>`` (nothing is deleted), so Snakemake
   finds it missing and regenerates it with the jobs downstream of it, which give the same files again.
2. **Stale files are found by content, whatever the timestamps.** Snakemake re-runs a job when an input is newer
   than its outputs and differs from the checksum it recorded for it; an input put back with an older modification
   time (``cp -p``, ``touch -d``, a restore that keeps times) is missed. Here every output Snakemake has a record of
   is compared input by input with the recorded checksums; where one differs, the output's modification time is
   set to just before that input's, and Snakemake re-runs it.
3. **Weights placed by hand are recorded.** A file under ``data/weights/`` without its record (the fetch rule never
   ran for it) gets its sha256 recorded beside it, and is checked against it whenever it is loaded.

Cost: a ``stat`` per file. A file is read (hashed) only when its size, modification time, change time or inode
differ from the last check, which keeps what it found in ``.snakemake/ifcl-checked.json``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .files import DIGEST_SUFFIX, FileCheckError, check_bytes, digest_file, file_sha256, recorded_digest
from .statefile import StateFormatError, state_meta

QUARANTINE = "quarantine"
CACHE = ".snakemake/ifcl-checked.json"
METADATA = ".snakemake/metadata"
# where text files written by ifcl steps live (each must have its digest beside it)
WRITTEN_TEXT = {"results": (".json", ".csv"), "data/prepared": (".csv",), "data/raw": (".json",),
                "data/weights": (".json",)}
@dataclass
class Report:
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (file, where it went, why)
    recorded: list[str] = field(default_factory=list)  # weights placed by hand, their sha256 now recorded
    stale: list[tuple[str, str]] = field(default_factory=list)  # (output, the input whose content changed)
    checked: int = 0
    hashed: int = 0

    def lines(self, dry_run: bool = False) -> list[str]:
        if dry_run:
            out = [f"ifcl check: {path} {why}; it would be moved aside and regenerated" for path, _, why in self.moved]
        else:
            out = [f"ifcl check: {path} {why}; moved to {dest}, it will be regenerated" for path, dest, why in self.moved]
        out += [f"ifcl check: {path} was made from other content of {inp}; it {'would' if dry_run else 'will'} be "
                "re-run" for path, inp in self.stale]
        out += [f"ifcl check: {path} was placed by hand; its sha256 is recorded beside it and checked on every use"
                for path in self.recorded]
        return out


def state_problem(path: Path, raw: bytes | None = None) -> str | None:
    """Why a state file fails its check (None: every byte is what ifcl wrote; :mod:`ifcl.statefile`)."""
    try:
        state_meta(path.read_bytes() if raw is None else raw)
    except StateFormatError as e:
        return str(e)
    return None


def text_problem(path: Path, raw: bytes) -> str | None:
    """Why a text file written by a step fails its check (None: it matches the digest beside it)."""
    if recorded_digest(path) is None:
        return "has no recorded digest"
    try:
        check_bytes(path, raw)
    except FileCheckError:
        return "does not match its recorded digest"
    return None


def _checkable(root: Path) -> list[Path]:
    """Every file under the checked folders that carries, or must carry, a digest."""
    found = []
    for folder, suffixes in WRITTEN_TEXT.items():
        base = root / folder
        if not base.is_dir():
            continue
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = Path(dirpath, name)
                if name.endswith(DIGEST_SUFFIX) or name.endswith(".part"):
                    continue
                if name.endswith(".safetensors") and folder == "results":
                    found.append(path)
                elif name.endswith(suffixes) or (path.parent / (name + DIGEST_SUFFIX)).exists():
                    found.append(path)
    return found


class _Cache:
    """What the last check found, by path: the file's stat signature, its sha256, whether it passed."""

    def __init__(self, root: Path):
        self.path = root / CACHE
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}
        self.hashed = 0

    @staticmethod
    def signature(path: Path) -> list[int]:
        """The file's stat, and its digest file's where it has one: a digest file damaged or replaced is found."""
        sig = []
        for p in (path, digest_file(path)):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig += [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        return sig

    def get(self, path: Path, key: str):
        entry = self.entries.get(str(path))
        return entry.get(key) if isinstance(entry, dict) and entry.get("stat") == self.signature(path) else None

    def put(self, path: Path, key: str, value) -> None:
        sig = self.signature(path)
        entry = self.entries.get(str(path))
        if not isinstance(entry, dict) or entry.get("stat") != sig:
            entry = self.entries[str(path)] = {"stat": sig}
        entry[key] = value

    def sha256(self, path: Path) -> str:
        value = self.get(path, "sha256")
        if value is None:
            value = file_sha256(path)
            self.hashed += 1
            self.put(path, "sha256", value)
        return value

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


def snakemake_records(root: Path):
    """(output path, record) of every output Snakemake has a metadata record of (its file persistence: one JSON
    file per output under .snakemake/metadata, named by the urlsafe base64 of the path, cut into folders of at most
    a file name's length, all but the last prefixed with '@')."""
    base = root / METADATA
    if not base.is_dir():
        return
    for dirpath, _, names in os.walk(base):
        for name in names:
            rel = Path(dirpath, name).relative_to(base)
            key = "".join(part.removeprefix("@") for part in rel.parts)
            try:
                output = base64.urlsafe_b64decode(key).decode()
                record = json.loads(Path(dirpath, name).read_text())
            except (ValueError, UnicodeDecodeError, OSError, RecursionError):
                continue
            if isinstance(record, dict):
                yield output, record


# Snakemake's command-line options under which it runs no job (with a dry run: the check only reports)
NO_JOBS = ("dryrun", "touch", "lint", "generate_unit_tests", "containerize", "export_cwl", "list_rules",
           "list_target_rules", "dag", "rulegraph", "filegraph", "d3dag", "summary", "detailed_summary", "archive",
           "cleanup_metadata", "cleanup_shadow", "unlock", "list_changes", "list_input_changes",
           "list_params_changes", "list_untracked", "delete_all_output", "delete_temp_output", "debug_dag",
           "print_compilation", "list_conda_envs", "conda_cleanup_envs", "conda_create_envs_only")


def _snakemake_args(argv: list[str]):
    from snakemake.cli import get_argument_parser

    try:
        return get_argument_parser().parse_known_args(argv)[0]
    except SystemExit:  # options Snakemake itself will refuse
        return None


def snakemake_cli_args() -> list[str] | None:
    """The options of the ``snakemake`` command this process runs, or None where Snakemake was started otherwise
    (from Python, whose ``sys.argv`` is another program's)."""
    import sys

    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if first.name == "snakemake" or first.parts[-2:] == ("snakemake", "__main__.py"):
        return sys.argv[1:]
    return None


def snakemake_runs_jobs(argv: list[str]) -> bool:
    """Whether Snakemake started with ``argv`` runs jobs (not a dry run, a lint, a report, a graph, a summary, an
    unlock, ...): only then may the check change files. (Snakemake reads its profile after this; a profile never
    holds these options.)"""
    args = _snakemake_args(argv)
    if args is None or (getattr(args, "report", None) and not getattr(args, "report_after_run", False)):
        return False
    return not any(getattr(args, name, None) for name in NO_JOBS)


def snakemake_command(argv: list[str], targets: list[str]) -> list[str]:
    """The Snakemake command of ``argv`` (its options: config, profile, cores, ...) for other ``targets``."""
    import sys

    args = _snakemake_args(argv)
    given = list(getattr(args, "targets", None) or [])
    rest = []
    for token in argv:
        if token in given:
            given.remove(token)
        else:
            rest.append(token)
    return [sys.executable, "-m", "snakemake", *targets, *rest]  # targets first: --configfile takes what follows


def check_workdir(root: str | Path = ".", dry_run: bool = False, mark_stale: bool | None = None) -> Report:
    """Check the pipeline's files under ``root`` (see the module docstring); with ``dry_run``, move and record
    nothing, only report. ``mark_stale`` (default: not ``dry_run``): set the timestamps of stale outputs (content
    unchanged), so that a dry run's plan shows their re-runs too."""
    mark_stale = not dry_run if mark_stale is None else mark_stale
    root = Path(root)
    cache = _Cache(root)
    report = Report()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for path in _checkable(root):
        report.checked += 1
        if cache.get(path, "ok"):
            continue
        raw = path.read_bytes()  # read once: checked here, and its sha256 kept for the inputs' comparison below
        problem = state_problem(path, raw) if path.suffix == ".safetensors" else text_problem(path, raw)
        cache.hashed += 1
        if problem is None:
            cache.put(path, "ok", True)
            cache.put(path, "sha256", hashlib.sha256(raw).hexdigest())
            continue
        rel = path.relative_to(root)
        dest = root / QUARANTINE / stamp / rel
        if not dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
            digest = path.with_name(path.name + DIGEST_SUFFIX)
            if digest.exists():
                shutil.move(digest, dest.with_name(dest.name + DIGEST_SUFFIX))
        report.moved.append((str(rel), str(dest.relative_to(root)), problem))
    damaged = {path for path, _, _ in report.moved}
    for output, record in snakemake_records(root):
        out = root / output
        if record.get("incomplete") or not out.is_file():
            continue
        checksums = record.get("input_checksums")
        for inp, recorded in (checksums.items() if isinstance(checksums, dict) else ()):
            src = root / inp
            if not isinstance(recorded, str) or not recorded or not src.is_file() or inp in damaged:
                continue  # (a damaged input is regenerated with the content the outputs were made from)
            if cache.sha256(src) != recorded.split(":", 1)[-1]:
                if mark_stale:
                    before = min(out.stat().st_mtime, src.stat().st_mtime) - 1
                    os.utime(out, (before, before))
                report.stale.append((output, inp))
                break
    report.hashed = cache.hashed
    if not dry_run:
        from .models.weights import record_placed_weights

        report.recorded = record_placed_weights(root)
        cache.save()
    return report
