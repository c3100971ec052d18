"""fusegpt plan: the predicted cost of a run, counted from measured per-block units, before any weight loads."""

import json

import pytest
import torch

from fusegpt.cli import main
from fusegpt.config import CompressConfig


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    folder = tmp_path_factory.mktemp("plan-gemma3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gemma3", 6)).save_pretrained(folder)
    return folder


def _cfg(**kw):
    base = dict(remove=2, group_size=3, nsamples=8, score_samples=4, seqlen=32, batch_size=4, epochs=2)
    return CompressConfig(**{**base, **kw})


def test_plan_counts_the_loop_step_by_step(gemma_folder):
    from fusegpt.plan import plan_run

    one = plan_run(str(gemma_folder), _cfg(mode="oneshot"), device="cpu", repeats=1)
    it = plan_run(str(gemma_folder), _cfg(mode="iterative"), device="cpu", repeats=1)
    assert one.removals == 2 and len(one.seconds_per_step) == 2 and one.blocks == 6
    assert one.seconds_total == pytest.approx(sum(one.phases.values()))
    assert all(v > 0 for v in one.timings.values())
    # one-shot scores once; iterative re-scores the (shallower) model: L(L-1)/2 + L block forwards per sweep
    per_fwd = lambda p: p.timings["block_forward"] * 1  # noqa: E731  (S = 4 windows = one mini-batch of 4)
    assert one.phases["scoring"] == pytest.approx((6 * 5 / 2 + 6) * per_fwd(one))
    assert it.phases["scoring"] == pytest.approx((6 * 5 / 2 + 6 + 5 * 4 / 2 + 5) * per_fwd(it))
    # training: epochs x ceil(N / B) steps of G fused blocks, every step
    assert one.phases["train"] == pytest.approx(2 * 2 * 2 * 3 * one.timings["train_step"])
    # two data-parallel processes split the candidates' sweeps (the full pass runs on both) and the mini-batches
    two = plan_run(str(gemma_folder), _cfg(mode="oneshot"), device="cpu", repeats=1, nproc=2)
    assert two.phases["scoring"] == pytest.approx((6 + 6 * 5 / 2 / 2) * per_fwd(two))
    with pytest.raises(ValueError, match="multiples"):
        plan_run(str(gemma_folder), _cfg(), device="cpu", repeats=1, nproc=3)
    with pytest.raises(ValueError, match="--final-nsamples"):  # the final stage's windows split evenly too
        plan_run(str(gemma_folder), _cfg(batch_size=2, final_epochs=1, final_nsamples=9, lora_rank=4),
                 device="cpu", repeats=1, nproc=2)
    # memory: baseline + the formula, the skeleton's parameters (no weights were loaded)
    assert one.peak_bytes == one.baseline_bytes + one.memory["total"]
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gemma_folder))
    assert one.params == sum(p.numel() for p in ref.parameters())


def test_plan_counts_the_dense_target_and_the_final_stage(gemma_folder):
    from fusegpt.plan import plan_run

    cur = plan_run(str(gemma_folder), _cfg(), device="cpu", repeats=1)
    rep = plan_run(str(gemma_folder), _cfg(target="dense", final_epochs=2, lora_rank=4), device="cpu", repeats=1)
    u = rep.timings
    # the dense target: L0 plain block forwards over N windows once, instead of G + 1 per removal
    assert rep.phases["teacher"] == pytest.approx(6 * 2 * u["block_forward"])
    assert cur.phases["teacher"] == pytest.approx(2 * (3 + 1) * 2 * cur.timings["block_forward"])
    # the final stage: epochs x ceil(N / B) steps of the L - k LoRA blocks + 3 head passes, and the NLL before
    # and after (one mini-batch of S windows through L - k blocks and the head, twice)
    assert "lora_step" in u and "head_forward" in u and "final" not in cur.phases
    assert rep.phases["final"] == pytest.approx(2 * 2 * (4 * u["lora_step"] + 3 * u["head_forward"])
                                                + 2 * (4 * u["block_forward"] + u["head_forward"]))
    assert rep.seconds_total == pytest.approx(sum(rep.phases.values()))
    assert rep.seconds_per_step[-1] > rep.phases["final"]
    # --final-loss nmse: the final stage's steps run no head (the NLL before and after still does)
    hs = plan_run(str(gemma_folder), _cfg(target="dense", final_epochs=2, lora_rank=4, final_loss="nmse"),
                  device="cpu", repeats=1)
    h = hs.timings
    assert hs.phases["final"] == pytest.approx(2 * 2 * 4 * h["lora_step"] + 2 * (4 * h["block_forward"]
                                                                                 + h["head_forward"]))
    # --final-positions 0.5: the steps' head passes on half the tokens
    half = plan_run(str(gemma_folder), _cfg(target="dense", final_epochs=2, lora_rank=4, final_positions=0.5),
                    device="cpu", repeats=1)
    f = half.timings
    assert half.phases["final"] == pytest.approx(2 * 2 * (4 * f["lora_step"] + 1.5 * f["head_forward"])
                                                 + 2 * (4 * f["block_forward"] + f["head_forward"]))
    # its memory: the formula's final-stage term (all remaining blocks train at once)
    assert rep.memory["final"] > 0 and cur.memory["final"] == 0
    # --final-nsamples 16: 4 mini-batches per final epoch; the 8 extra windows' dense targets (L0 forwards each)
    own = plan_run(str(gemma_folder), _cfg(target="dense", final_epochs=2, lora_rank=4, final_nsamples=16),
                   device="cpu", repeats=1)
    v = own.timings
    assert own.phases["teacher"] == pytest.approx(6 * 4 * v["block_forward"])
    assert own.phases["final"] == pytest.approx(2 * 4 * (4 * v["lora_step"] + 3 * v["head_forward"])
                                                + 2 * (4 * v["block_forward"] + v["head_forward"]))
    assert own.memory["final"] > rep.memory["final"]  # its windows and their targets


def test_plan_counts_the_search_of_search_methods(gemma_folder):
    from fusegpt.plan import plan_run

    kw = dict(search_generations=2, search_offspring=4, search_fitness_samples=8, search_stages=2,
              search_fuse_samples=4, search_fuse_epochs=1)
    base = plan_run(str(gemma_folder), CompressConfig.from_dict(_cfg().to_dict() | kw), device="cpu", repeats=1)
    drop = plan_run(str(gemma_folder), CompressConfig.from_dict(_cfg(method="evopress").to_dict() | kw),
                    device="cpu", repeats=1)
    fuse = plan_run(str(gemma_folder), CompressConfig.from_dict(_cfg(method="fusegpt-evo").to_dict() | kw),
                    device="cpu", repeats=1)
    assert "search" not in base.phases and drop.phases["search"] > 0 and fuse.phases["search"] > 0
    u = drop.timings["block_forward"] / 4  # per window
    seed_scoring = (6 + 6 * 5 / 2) * drop.timings["block_forward"]
    # drop: the seed (8 windows) + 2 generations x (4 children x 4 windows + 1 survivor x 4 more windows)
    windows = 8 + 2 * (4 * 4 + 1 * 4)
    want = seed_scoring + 8 * 6 * u + windows * (6 - 2) / 2 * u
    assert drop.phases["search"] == pytest.approx(want, rel=1e-6)
    assert any("9 candidates" in n for n in fuse.notes)  # 1 + 2 x 4, each fused on a copy
    assert fuse.memory["search_model_copy"] == 4 * fuse.params and "search_model_copy" not in drop.memory
    assert fuse.peak_bytes == fuse.baseline_bytes + fuse.memory["total"]
    assert fuse.seconds_total == pytest.approx(sum(fuse.phases.values()))


def test_plan_cli_and_compress_report_carry_the_prediction(tiny_folder, tmp_path, capsys):
    args = ["--remove", "1", "--group-size", "2", "--nsamples", "4", "--score-samples", "2", "--seqlen", "32",
            "--epochs", "1", "--batch-size", "2"]
    assert main(["plan", str(tiny_folder), *args, "--json", str(tmp_path / "plan.json"), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "predicted time" in out and "predicted peak memory" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["removals"] == 1 and plan["seconds_total"] > 0
    assert main(["compress", str(tiny_folder), *args, "--no-eval", "--out", str(tmp_path / "run")]) == 0
    rep = json.loads((tmp_path / "run" / "fusegpt_report.json").read_text())
    assert rep["plan"]["predicted_seconds"] > 0 and rep["plan"]["measured_seconds"] == pytest.approx(rep["seconds"])
    assert rep["plan"]["predicted_peak_bytes"] > 0
    # a plan refuses what compress would refuse, before timing anything
    assert main(["plan", str(tiny_folder), "--remove", "9"]) == 2


def test_plan_says_when_the_model_would_stream(tiny_folder, tmp_path, capsys, monkeypatch):
    """A model too large for the memory available is planned as compress would run it: blocks streamed from the
    checkpoint (and the activation cache on disk, the preset's final stage off), and the plan says why."""
    import fusegpt.api

    args = ["--remove", "1", "--group-size", "2", "--nsamples", "4", "--score-samples", "2", "--seqlen", "32",
            "--epochs", "1", "--batch-size", "2", "--repeats", "1"]
    assert main(["plan", str(tiny_folder), *args, "--json", str(tmp_path / "fits.json")]) == 0
    monkeypatch.setattr(fusegpt.api, "available_memory_bytes", lambda device: 64 << 10)
    assert main(["plan", str(tiny_folder), *args, "--json", str(tmp_path / "streams.json")]) == 0
    out = capsys.readouterr().out
    assert "do not fit" in out and "loaded one at a time (--offload disk)" in out
    fits, streams = (json.loads((tmp_path / f).read_text()) for f in ("fits.json", "streams.json"))
    assert fits["memory"]["final"] > 0 and streams["memory"]["final"] == 0
    assert fits["cache_disk_bytes"] == 0 and streams["cache_disk_bytes"] > 0  # the activation cache on disk too
