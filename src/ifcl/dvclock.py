"""What a plain ``snakemake`` run made, recorded in ``dvc.lock``, so that ``dvc exp run`` keeps it.

``dvc exp run`` (with or without ``-S``) starts by checking out every output of ``dvc.yaml`` as ``dvc.lock`` records
it, with force, before any stage runs (dvc/repo/experiments/executor/base.py: ``dvc_checkout(..., force=True,
allow_missing=True)``). ``persist`` does not apply there: it only keeps ``dvc repro`` from deleting a stage's
outputs before the stage's command. So results made by plain ``snakemake`` that ``dvc.lock`` does not record are
thrown away: an output without a hash in ``dvc.lock`` (no lock yet) is deleted, one recorded with older content is
put back to that content (the files made since are deleted), and the pipeline stage then computes them again.
Files tracked by a ``.dvc`` file (``data.dvc``) are spared: ``dvc exp run`` commits those first.

:func:`record_outputs` makes ``dvc.lock`` record, for every stage whose outputs on disk differ from it, those
outputs as they are (their content goes to DVC's cache, as ``dvc commit`` does). The stage's dependencies are left
unrecorded: DVC did not run the stage, so the next ``dvc repro`` or ``dvc exp run`` runs it once more, and Snakemake
decides inside it what is left to compute (nothing, after a complete run). The workflow calls it when a Snakemake
run ends (``onsuccess``/``onerror``); by hand, ``python -m ifcl.dvclock`` (after a Snakemake run that was killed).
Inside a DVC stage (``DVC_STAGE`` is set) it does nothing: DVC records the stage itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def record_outputs(root: str | Path = ".") -> list[str]:
    """Record the outputs on disk in ``root``'s ``dvc.lock``; the names of the stages recorded anew."""
    root = Path(root)
    if os.environ.get("DVC_STAGE") or not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return []
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo, lock_repo
    from dvc.stage import PipelineStage
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta

    recorded = []
    with Repo(os.fspath(root)) as repo, lock_repo(repo):
        for stage in repo.index.stages:
            if not isinstance(stage, PipelineStage):  # .dvc files: `dvc add`, and `dvc exp run` commits them
                continue
            outs = [out for out in stage.outs if out.use_cache and out.exists]
            if not any(out.changed() for out in outs):
                continue
            for out in outs:
                out.save()
                out.commit(relink=False)
            for dep in stage.deps:  # not recorded: DVC runs the stage again, Snakemake decides what to compute
                if isinstance(dep, ParamsDependency):
                    dep.hash_info = HashInfo(dep.PARAM_PARAMS, {})
                else:
                    dep.hash_info, dep.meta = HashInfo(), Meta()
            stage.dump(update_pipeline=False)
            recorded.append(stage.addressing)
    return recorded


def record_after_run() -> None:
    """The workflow's hook at the end of a Snakemake run: record, and say so; never fail the run."""
    try:
        recorded = record_outputs()
    except Exception as e:  # noqa: BLE001 - a lock held by another DVC command, a repository without git, ...
        print(f"ifcl: dvc.lock not updated ({type(e).__name__}: {e}): `dvc exp run` would reset the outputs it "
              "does not record; run `python -m ifcl.dvclock` before it", file=sys.stderr)
        return
    if recorded:
        print(f"ifcl: dvc.lock records the outputs of stage(s) {', '.join(recorded)} as they are now, so `dvc exp "
              "run` keeps them; DVC runs these stages once more, and Snakemake finds what is done",
              file=sys.stderr)


if __name__ == "__main__":
    stages = record_outputs()
    print(f"recorded: {', '.join(stages)}" if stages else "dvc.lock already records every output on disk")
