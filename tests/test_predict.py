"""`ifcl run evaluate` and `ifcl run predict` (ifcl.predict) on the session's tiny run, which they only read: the
evaluation again gives the run's eval.json, and the predictions on one's own images are the evaluation's arg-max."""
import csv
import shutil

import pytest
import torch

from conftest import TINY_CONFIG
from ifcl.cli import main
from ifcl.config import load_config
from ifcl.data.manifest import class_names_of, read_manifest
from ifcl.files import read_json

CONFIG = "config.yaml"  # the tiny run's config, in its working directory


@pytest.fixture
def in_tiny_run(tiny_run, monkeypatch):
    """The tiny run as the working directory (manifests list image paths relative to it), on the CPU it ran on."""
    monkeypatch.chdir(tiny_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return tiny_run


def ifcl_run(capsys, *args: str) -> str:
    main(["run", *args])
    return capsys.readouterr().out


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def write_plain_csv(path, rows) -> None:
    """A manifest as a user would write it: no recorded digest beside it."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class_name"])
        writer.writerows(rows)


@pytest.mark.parametrize("experiment, task", [("tiny_inflora-ca", 2), ("tiny_seq-lora", 1), ("tiny_diki", 1),
                                              ("tiny_wise-ft", 1), ("tiny_lwf-vr", 0), ("tiny_moe-adapters", 1)])
def test_evaluate_gives_the_runs_eval_json(in_tiny_run, capsys, experiment, task):
    """On the run's test set (class-incremental: the classes seen through the task; DIKI: every dataset) every
    figure of eval.json, exactly; the command prints the accuracy beside eval.json's."""
    from ifcl.predict import evaluate

    seed = 1 if experiment == "tiny_seq-lora" else 0  # seed 1: a shuffled class order
    threads = torch.get_num_threads()
    result, recorded, evaluated = evaluate(CONFIG, experiment, seed, task)
    assert torch.get_num_threads() == threads  # the step's single thread is not left behind
    eval_json = read_json(in_tiny_run / f"results/runs/{experiment}/seed{seed}/task{task}/eval.json")
    assert recorded == eval_json and result == eval_json
    out = ifcl_run(capsys, "evaluate", "--configfile", CONFIG, experiment, str(seed), str(task))
    accuracies = eval_json["accuracy"] if isinstance(eval_json["accuracy"], list) else [eval_json["accuracy"]]
    for name, accuracy in zip(evaluated, accuracies):
        assert f"{name}: accuracy {accuracy:.2f}% (eval.json {accuracy:.2f}%)" in out
    assert "every figure equals the run's eval.json" in out


def test_evaluate_on_a_users_manifest(in_tiny_run, tmp_path, capsys):
    """--manifest: a CSV of one's own (no recorded digest). The test set's rows in it give eval.json's figures (a
    DIKI dataset's: its row of eval.json, the frozen features computed as the pipeline computes them); a label
    named differently from the run's data is refused, naming the image."""
    from ifcl.predict import evaluate

    rows = read_manifest("data/prepared/tiny_shapes/test.csv")
    write_plain_csv(tmp_path / "mine.csv", rows)
    result, recorded, _ = evaluate(CONFIG, "tiny_inflora", 0, 1, str(tmp_path / "mine.csv"))
    assert recorded is None
    assert result == read_json(in_tiny_run / "results/runs/tiny_inflora/seed0/task1/eval.json")

    write_plain_csv(tmp_path / "textures.csv", read_manifest("data/prepared/tc_textures/test.csv"))
    out = ifcl_run(capsys, "evaluate", "--configfile", CONFIG, "tiny_diki", "0", "1", "--manifest",
                   str(tmp_path / "textures.csv"))
    row = read_json(in_tiny_run / "results/runs/tiny_diki/seed0/task1/eval.json")
    assert f"textures.csv: accuracy {row['accuracy'][1]:.2f}%, mean λ {row['mean_weight'][1]:.3f}" in out

    wrong = [(p, label, "a dog" if i == 4 else name) for i, (p, label, name) in enumerate(rows)]
    write_plain_csv(tmp_path / "wrong.csv", wrong)
    with pytest.raises(SystemExit) as exit:
        ifcl_run(capsys, "evaluate", "--configfile", CONFIG, "tiny_inflora", "0", "1", "--manifest",
                 str(tmp_path / "wrong.csv"))
    assert rows[4][0] in str(exit.value) and "'a dog'" in str(exit.value)


def evaluation_logits_of_inflora(experiment: str, seed: int, task: int) -> dict[str, torch.Tensor]:
    """Image path -> the logits the class-incremental evaluation computes for it (the step's loader and forward)."""
    from ifcl.runs import load_model
    from ifcl.steps.cil import task_loader
    from ifcl.training import predict_logits

    config = load_config(TINY_CONFIG)
    spec = config["experiments"][experiment]
    tasks = read_json(f"results/runs/{experiment}/seed{seed}/tasks.json")
    seen = [c for t in tasks["tasks"][: task + 1] for c in t]
    manifest = f"data/prepared/{spec['dataset']}/test.csv"
    loader = task_loader(manifest, seen, tasks, config["datasets"][spec["dataset"]], config["backbones"][spec["backbone"]],
                     False, spec["eval_batch_size"], "cpu")
    logits, _ = predict_logits(load_model(config, experiment, seed, task), loader)
    paths = [p for p, label, _ in read_manifest(manifest) if label in seen]
    return dict(zip(paths, logits))


def test_predict_on_a_folder_gives_the_evaluations_argmax(in_tiny_run, tmp_path, capsys):
    """A folder (nested) of test images: one row per image, the columns, class names as the run names them (a
    shuffled class order), and per image the evaluation's arg-max with its softmax probability."""
    experiment, seed, task = "tiny_seq-lora", 1, 1
    tasks = read_json(f"results/runs/{experiment}/seed{seed}/tasks.json")
    expected = evaluation_logits_of_inflora(experiment, seed, task)
    order = tasks["class_order"]
    names = [tasks["class_names"][label] for label in order[: sum(len(c) for c in tasks["tasks"][: task + 1])]]
    folder = tmp_path / "images"
    copied = {}
    for path in list(expected)[::2]:  # some of the test images, each class folder under a folder of its own
        to = folder / "nested" / path.split("/")[-2] / path.split("/")[-1]
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, to)
        copied[str(to)] = path
    out = ifcl_run(capsys, "predict", "--configfile", CONFIG, experiment, str(seed), str(task), str(folder),
                   "--out", str(tmp_path / "predictions.csv"))
    columns, rows = read_rows(tmp_path / "predictions.csv")
    assert columns == ["path", "predicted_class", "score"]
    assert sorted(r["path"] for r in rows) == sorted(copied) and f"{len(copied)} images" in out
    for row in rows:
        logits = expected[copied[row["path"]]]
        assert row["predicted_class"] == names[int(logits.argmax())]
        assert float(row["score"]) == pytest.approx(float(logits.softmax(0).max()), abs=1e-5)
    assert {r["predicted_class"] for r in rows} <= set(names)


def test_predict_with_diki_gives_the_task_lambda_and_the_evaluations_argmax(in_tiny_run, tmp_path, capsys):
    """A list file of a dataset's test images in the evaluation's order, with that dataset's classes: per image the
    arg-max, the chosen task and λ of the evaluation (its batches, its calibration), and so eval.json's accuracy.
    Without --dataset each image is classified among the classes of its chosen task's dataset; with it among that
    dataset's, whatever the task."""
    from ifcl.models.diki import calibrated_logits
    from ifcl.runs import load_model
    from ifcl.state import load_state
    from ifcl.steps.diki import _batches, _prompt_tokens

    config = load_config(TINY_CONFIG)
    spec = config["experiments"]["tiny_diki"]
    manifest = "data/prepared/tc_textures/test.csv"
    rows = read_manifest(manifest)
    (tmp_path / "list.txt").write_text("# the test images\n" + "".join(f"{p}\n" for p, _, _ in rows))
    out_csv = tmp_path / "predictions.csv"
    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_diki", "0", "1", str(tmp_path / "list.txt"),
             "--dataset", "tc_textures", "--out", str(out_csv))
    columns, predicted = read_rows(out_csv)
    assert columns == ["path", "predicted_class", "score", "task", "task_dataset", "lambda"]
    assert [r["path"] for r in predicted] == [p for p, _, _ in rows]

    model = load_model(config, "tiny_diki", 0, 1)
    frozen = load_state("results/features/tiny_clip/tc_textures/test.safetensors")[0]["features"]
    tokens = _prompt_tokens(manifest, config["datasets"]["tc_textures"], model.model.clip)
    names = class_names_of(rows)
    done = 0
    for x, _ in _batches(manifest, config["backbones"]["tiny_clip"], spec["eval_batch_size"], "cpu"):
        logits, ids, lam = calibrated_logits(model.model, model.task_prefixes(), model.gaussians, x, tokens,
                                             frozen[done: done + len(x)], model.calibration)
        scores = (float(model.model.logit_scale()) * logits).softmax(1).max(1).values  # CLIP's logits
        for r, c, s, u, w in zip(predicted[done: done + len(x)], logits.argmax(1), scores, ids, lam):
            assert (r["predicted_class"], int(r["task"])) == (names[int(c)], int(u))
            assert float(r["score"]) == pytest.approx(float(s), abs=1e-4)
            assert r["task_dataset"] == spec["sequence"][int(u)]
            assert float(r["lambda"]) == pytest.approx(float(w), abs=1e-4)
        done += len(x)
    correct = sum(r["predicted_class"] == name for r, (_, _, name) in zip(predicted, rows))
    eval_json = read_json("results/runs/tiny_diki/seed0/task1/eval.json")
    assert 100.0 * correct / len(rows) == eval_json["accuracy"][1]

    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_diki", "0", "1", manifest, "--out", str(out_csv))
    _, own = read_rows(out_csv)
    classes = {ds: {name for _, _, name in read_manifest(f"data/prepared/{ds}/test.csv")} for ds in spec["sequence"]}
    assert all(r["predicted_class"] in classes[r["task_dataset"]] for r in own)
    assert [(r["task"], r["lambda"]) for r in own] == [(r["task"], r["lambda"]) for r in predicted]
    shapes = "data/prepared/tc_shapes/test.csv"
    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_diki", "0", "1", shapes, "--dataset", "tc_textures",
             "--out", str(out_csv))
    assert {r["predicted_class"] for r in read_rows(out_csv)[1]} <= classes["tc_textures"]


def test_predict_names_an_unreadable_image_or_a_missing_path(in_tiny_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy("data/generated/tiny_shapes/test/cyan_triangle/00000.png", folder / "good.png")
    (folder / "broken.png").write_bytes(b"not an image")
    args = ["predict", "--configfile", CONFIG, "tiny_inflora", "0", "1", "--out", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as exit:
        ifcl_run(capsys, *args, str(folder))
    assert f"cannot read image {folder / 'broken.png'}" in str(exit.value)
    with pytest.raises(SystemExit) as exit:
        ifcl_run(capsys, *args, str(tmp_path / "nothing.png"))
    assert f"no such image, folder or list file: {tmp_path / 'nothing.png'}" in str(exit.value)
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_a_fine_tuned_clip_gives_the_evaluations_argmax(in_tiny_run, tmp_path, capsys):
    """The MTIL full fine-tuning family: with --dataset, each image among that dataset's classes, whose accuracy on
    its test images is eval.json's; without, among every class of the sequence."""
    manifest = "data/prepared/tc_textures/test.csv"
    rows = read_manifest(manifest)
    out_csv = tmp_path / "predictions.csv"
    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_wise-ft", "0", "1", manifest, "--dataset",
             "tc_textures", "--out", str(out_csv))
    columns, predicted = read_rows(out_csv)
    assert columns == ["path", "predicted_class", "score", "task", "task_dataset", "lambda"][:3]
    correct = sum(r["predicted_class"] == name for r, (_, _, name) in zip(predicted, rows))
    assert 100.0 * correct / len(rows) == read_json("results/runs/tiny_wise-ft/seed0/task1/eval.json")["accuracy"][1]
    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_wise-ft", "0", "1", manifest, "--out", str(out_csv))
    every = {name for ds in ("tc_shapes", "tc_textures") for _, _, name in read_manifest(f"data/prepared/{ds}/test.csv")}
    assert {r["predicted_class"] for r in read_rows(out_csv)[1]} <= every


def test_predict_with_moe_adapters_gives_the_evaluations_accuracy(in_tiny_run, tmp_path, capsys):
    """MoE-Adapters: the model after the task from its files (experts, routers, DDAS's autoencoders), each batch
    through the router DDAS picks; on a dataset's test images in the evaluation's order and batches, with that
    dataset's classes, the accuracy of eval.json; without --dataset, among every class of the sequence."""
    from ifcl.runs import load_model

    config = load_config(TINY_CONFIG)
    model = load_model(config, "tiny_moe-adapters", 0, 1)
    assert model.moe.num_tasks == 2 and len(model.autoencoders) == 3  # the reference slot and one per task
    for t, manifest in enumerate(["data/prepared/tc_shapes/test.csv", "data/prepared/tc_textures/test.csv"]):
        rows = read_manifest(manifest)
        out_csv = tmp_path / f"predictions{t}.csv"
        ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_moe-adapters", "0", "1", manifest, "--dataset",
                 config["experiments"]["tiny_moe-adapters"]["sequence"][t], "--out", str(out_csv))
        columns, predicted = read_rows(out_csv)
        assert columns == ["path", "predicted_class", "score"] and len(predicted) == len(rows)
        correct = sum(r["predicted_class"] == name for r, (_, _, name) in zip(predicted, rows))
        eval_json = read_json("results/runs/tiny_moe-adapters/seed0/task1/eval.json")
        assert 100.0 * correct / len(rows) == eval_json["accuracy"][t]
    ifcl_run(capsys, "predict", "--configfile", CONFIG, "tiny_moe-adapters", "0", "1", manifest, "--out",
             str(out_csv))
    every = {name for ds in ("tc_shapes", "tc_textures") for _, _, name in read_manifest(f"data/prepared/{ds}/test.csv")}
    assert {r["predicted_class"] for r in read_rows(out_csv)[1]} <= every
