"""`ifcl bench speed` (ifcl.benchmark): its official-style references compute the same functions as ifcl's code
(otherwise the speed-ups would compare different work), and the command writes its report. Times are printed by
the benchmark, never asserted here."""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from ifcl import benchmark as bench
from ifcl.models.diki import calibrated_logits
from ifcl.methods.inflora import update_memory

TINY = bench.PRESETS["tiny"]


def test_the_official_style_vit_sums_every_branch_and_computes_what_the_merged_model_computes():
    x = torch.rand(3, 3, TINY["image_size"], TINY["image_size"])
    ours, _, ours_current, ours_every = bench.inflora_models(TINY, 4, "ifcl", torch.device("cpu"))
    ref, trainable, ref_current, ref_every = bench.inflora_models(TINY, 4, "official-style", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(ref_current(x), ours_current(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref_every(x), ours_every(x), rtol=1e-4, atol=1e-5)
        assert ours_every(x).shape == (3, 5 * 10)
        # the reference really keeps the old branches apart: zeroing one changes its output
        ref.blocks[0].attn.up_k[1].weight.zero_()
        assert not torch.allclose(ref_every(x), ours_every(x), atol=1e-5)
    # trainable: E_t of k and v in every block, and head t
    assert len(trainable) == 2 * TINY["depth"] + 2 and all(p.requires_grad for p in trainable)


def test_the_official_style_collection_pass_collects_the_same_second_moments():
    from ifcl.steps.inflora import collect_second_moments

    x = torch.rand(4, 3, TINY["image_size"], TINY["image_size"])
    ours, _, _, _ = bench.inflora_models(TINY, 2, "ifcl", torch.device("cpu"))
    ref, _, _, _ = bench.inflora_models(TINY, 2, "official-style", torch.device("cpu"))
    expected = collect_second_moments(ours, [(x, None)], torch.device("cpu"))
    for a in (blk.attn for blk in ref.blocks):
        a.moment, a.count = torch.zeros(TINY["embed_dim"], TINY["embed_dim"]), 0
    with torch.no_grad():
        ref.forward_features(x)
    for a, c in zip((blk.attn for blk in ref.blocks), expected):
        torch.testing.assert_close(a.moment, c, rtol=1e-4, atol=1e-6)


def test_the_official_style_memory_update_keeps_the_same_space():
    gen = torch.Generator().manual_seed(0)
    d = 32
    covs = []
    for _ in range(3):
        a = torch.randn(d, d, generator=gen) * torch.logspace(0, -2, d)
        covs.append(a @ a.T / d)
    ours, ref = None, None
    for t, (c, eps) in enumerate(zip(covs, (0.9, 0.95, 0.99))):
        ours = update_memory(ours, c, eps)
        ref, projector = bench.official_style_memory_update(ref, c, eps)
        assert ref[1] == ours.kind, f"task {t}"
        torch.testing.assert_close(projector, ours.basis @ ours.basis.T, rtol=0, atol=1e-4)


def test_the_official_style_calibrated_inference_gives_ifcls_logits():
    dev = torch.device("cpu")
    model, official = bench.diki_model(TINY, dev), bench.diki_model(TINY, dev, "official-style")
    assert isinstance(model.clip.visual.transformer.resblocks[0].mlp.gelu, torch.nn.SiLU)  # folded QuickGELU
    assert not isinstance(official.clip.visual.transformer.resblocks[0].mlp.gelu, torch.nn.SiLU)
    prefixes, gaussians = bench.diki_tasks(model, 3, dev, torch.Generator().manual_seed(0))
    tokens = bench.class_tokens(TINY, model)
    x = torch.rand(6, 3, TINY["image_size"], TINY["image_size"])
    means = torch.stack([g.mean for g in gaussians])
    covs = torch.stack([g.covariance for g in gaussians])
    with torch.no_grad():
        frozen = F.normalize(model.clip.encode_image(x), dim=-1)
        ours, _, lam = calibrated_logits(model, prefixes, gaussians, x, tokens, frozen,
                                         {"batchwise": True, "scale": 512, "weight": "likelihood"})
        ref = bench.official_style_calibrated_logits(official, prefixes, means, covs, x, tokens)
    # the reference runs the text tower on the full context, ifcl up to the end token only
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    torch.testing.assert_close(ref, ours, rtol=1e-4, atol=1e-5)


def test_bench_speed_writes_a_report_with_the_ratios(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "speed", "--preset", "tiny", "--repeats", "1",
                           "--warmup", "0", "--case", "inflora_step", "--case", "diki_eval", "--case", "inflora_train_e2e",
                           "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["speedups"]) == {"inflora_step@T=1", "inflora_step@T=10", "inflora_step@T=20",
                                       "inflora_train_e2e@T=10", "diki_eval@T=11"}
    assert {(r["case"], r["impl"]) for r in report["results"]} == {
        (c, i) for c in ("inflora_step", "inflora_train_e2e", "diki_eval") for i in ("ifcl", "official-style")}
    assert all(r["seconds_per_step"] > 0 and r["peak_memory_mb"] > 0 for r in report["results"])
    assert set(report["inflora_step_seconds_by_learnt_tasks"]["ifcl"]) == {"1", "10", "20"}
    assert "| inflora_step | 10 | ifcl |" in proc.stdout and "speed-up" in proc.stdout


def test_the_fine_tuning_cases_compute_the_same_step_both_ways_and_moe_is_timed_alone():
    """finetune_step / lwf_step / zscl_step: the official-style side re-encodes the teacher's reference texts in
    every step, ifcl once; the weights after one step are the same. moe_step and the state-chain methods' steps have no reference: ifcl alone."""
    from ifcl.benchmark import CASES, IFCL_ONLY, PRESETS, run_benchmark

    torch.manual_seed(0)
    for case in ("finetune_step", "lwf_step", "zscl_step"):
        after = []
        for impl in ("official-style", "ifcl"):
            _, step = CASES[case](PRESETS["tiny"], torch.device("cpu"), impl, 1)
            step()
            closure = {c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module)}
            clip = next(m for m in closure if any(p.requires_grad for p in m.parameters()))
            after.append(torch.cat([p.detach().flatten() for p in clip.parameters()]))
        torch.testing.assert_close(after[0], after[1], rtol=1e-5, atol=1e-6)
    state_cases = ["lae_step", "clora_step", "slca_step", "ease_step", "mos_step", "hide_step"]
    assert IFCL_ONLY == {"moe_step", *state_cases}
    report = run_benchmark("tiny", repeats=1, warmup=0, cases=["moe_step", *state_cases], log=lambda line: None)
    assert [(r["case"], r["impl"]) for r in report["results"]] == [(c, "ifcl") for c in ["moe_step", *state_cases]]
    assert not report["speedups"]
