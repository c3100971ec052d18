"""FuseGPT core on tiny models: MI cache == brute force, identity at start, iterative vs one-shot, faults."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fusegpt.activations import ActivationCache, Runner
from fusegpt.adapters import get_adapter
from fusegpt.api import compress
from fusegpt.config import CompressConfig, ConfigError, num_removals
from fusegpt.distill import get_loss, group_window, train_group, ParamGroup, TrainSettings
from fusegpt.scoring import macro_influence_scores

from conftest import final_hidden_without, random_ids, tiny_model

CPU = torch.device("cpu")


def test_cached_mi_equals_brute_force(family):
    model = tiny_model(family)
    ids = random_ids(3, 16)
    runner = Runner.for_model(get_adapter(model), 16, device=CPU, batch_size=2)
    cache = ActivationCache(runner, ids)
    scores = macro_influence_scores(cache, desc=None)
    full = final_hidden_without(model, ids, None)
    brute = [1 - F.cosine_similarity(full, final_hidden_without(model, ids, i), dim=-1).mean().item()
             for i in range(6)]
    assert scores == pytest.approx(brute, rel=1e-4, abs=1e-6)


def test_cache_prefix_reuse_after_change():
    model = tiny_model("llama")
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 16, device=CPU)
    cache = ActivationCache(runner, random_ids(2, 16))
    cache.get(6)
    assert cache.valid == 7
    ad.remove_blocks([3])
    cache.truncate(3)
    assert cache.valid == 3
    ref = runner.run_model_blocks(cache.get(0))
    torch.testing.assert_close(cache.get(5), ref, rtol=0, atol=0)


@pytest.mark.parametrize("p,n,g,expected", [
    (10, 30, 7, [6, 7, 8, 9, 11, 12, 13]),  # 4 before, 3 after (the reference window of 8)
    (0, 30, 7, [1, 2, 3, 4, 5, 6, 7]),
    (29, 30, 7, [22, 23, 24, 25, 26, 27, 28]),
    (5, 30, 1, [4]),
    (5, 30, 3, [3, 4, 6]),
    (2, 4, 7, [0, 1, 3]),
])
def test_group_window(p, n, g, expected):
    assert group_window(p, n, g) == expected


def test_reference_kl_loss_is_softmax_over_batch():
    s, t = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    ref = F.kl_div(F.log_softmax(s, dim=0), F.softmax(t, dim=0), reduction="batchmean")
    assert torch.allclose(get_loss("kl-batch")(s, t), ref)
    assert get_loss("cosine")(t, t).abs() < 1e-6 and get_loss("kl-hidden")(t, t).abs() < 1e-6


def _cfg(**kw):
    base = dict(remove=2, group_size=3, epochs=2, nsamples=8, score_samples=4, seqlen=16, coef_rank=4,
                lora_rank=4, batch_size=4, compute_dtype="fp32")
    base.update(kw)
    return CompressConfig(**base)


def test_iterative_rescores_and_oneshot_scores_once():
    ids = random_ids(8, 16)
    rep = compress(tiny_model("llama", 8), _cfg(mode="iterative"), calib_ids=ids)
    assert all(s.scores is not None for s in rep.steps)
    assert len(rep.steps[1].scores) == 7  # re-scored on the 7-block model
    assert rep.final_layers == 6 and len(set(rep.removed)) == 2
    rep1 = compress(tiny_model("llama", 8), _cfg(mode="oneshot", remove=3), calib_ids=ids)
    assert rep1.steps[0].scores is not None and rep1.steps[1].scores is None
    first = rep1.steps[0].scores
    assert rep1.removed == sorted(first, key=first.get)[:3]


def test_first_removal_is_argmin_mi_and_training_reduces_group_loss():
    ids = random_ids(8, 16)
    model = tiny_model("qwen2", 8)
    runner = Runner.for_model(get_adapter(model), 16, device=CPU)
    mi = macro_influence_scores(ActivationCache(runner, ids[:4]), desc=None)
    rep = compress(model, _cfg(remove=1, epochs=8, coef_lr=1e-2, lr=1e-3), calib_ids=ids)
    assert rep.removed == [min(range(8), key=mi.__getitem__)]
    s = rep.steps[0]
    assert s.loss_after < s.loss_before


@pytest.mark.parametrize("train", ["coef", "coef+lora", "full"])
@pytest.mark.parametrize("coef", ["scalar", "vector", "matrix", "lowrank"])
def test_train_modes_and_coefficients_run(train, coef):
    rep = compress(tiny_model("llama", 6), _cfg(remove=1, train=train, coef=coef, consolidate=False),
                   calib_ids=random_ids(8, 16))
    assert rep.steps[0].train_steps == 4


def _poison_training_calls(monkeypatch, at, how="nan"):
    """Make the mse loss diverge on the training calls (gradients on) whose 1-based number is in ``at``: NaN, or
    1e6 x its value (past the divergence factor); no-grad evaluation calls are left alone."""
    import fusegpt.distill.losses as losses

    real = losses.LOSSES["mse"]
    calls = {"n": 0}

    def poisoned(s, t):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in at:
                return real(s, t) * (float("nan") if how == "nan" else 1e6)
        return real(s, t)

    monkeypatch.setitem(losses.LOSSES, "mse", poisoned)
    return calls


def _spy_trainer(monkeypatch):
    """Record, for every train_group call, its learning rates and the trained parameters at entry and at exit."""
    import fusegpt.methods.fusegpt as fg

    real = fg.train_group
    calls = []

    def spy(runner, blocks, kinds, x, y, groups, settings, **kw):
        entry = [p.detach().clone() for g in groups for p in g.params]
        res = real(runner, blocks, kinds, x, y, groups, settings, **kw)
        calls.append({"lrs": [g.lr for g in groups], "entry": entry,
                      "exit": [p.detach().clone() for g in groups for p in g.params], "res": res})
        return res

    monkeypatch.setattr(fg, "train_group", spy)
    return calls


def _run_poisoned(monkeypatch, at, how="nan"):
    _poison_training_calls(monkeypatch, at, how)
    calls = _spy_trainer(monkeypatch)
    real_step = torch.optim.Adam.step
    stepped = []

    def step(self, *a, **k):  # the trained parameters after every optimizer step
        out = real_step(self, *a, **k)
        stepped.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    calls.append(stepped)
    ids = random_ids(8, 16)
    model = tiny_model("llama", 6)
    plain = copy.deepcopy(model)
    rep = compress(model, _cfg(remove=1, consolidate=False, epochs=2, batch_size=2, coef_lr=1e-1, lr=1e-2),
                   calib_ids=ids)
    get_adapter(plain).remove_blocks([rep.steps[0].removed])
    return rep.steps[0], calls, model, plain, ids


@pytest.mark.parametrize("how", ["nan", "grow"])
def test_divergence_after_steps_restores_the_group_and_retries_at_half_lr(monkeypatch, how):
    """Two optimizer steps change the group, the third loss diverges (NaN, or 1e6 x: past the factor 100): the
    group is restored to exactly its values before training and trained again at half the learning rates."""
    s, calls, model, plain, ids = _run_poisoned(monkeypatch, at={3}, how=how)
    stepped = calls.pop(0)
    assert len(calls) == 2
    first, retry = calls
    assert first["res"].diverged and first["res"].steps == 2 and first["res"].restored
    assert ("non-finite" if how == "nan" else "> 100 x") in first["res"].reason
    # the two steps had changed the parameters; the restore undid them exactly
    assert any(not torch.equal(a, b) for a, b in zip(stepped[1], first["entry"]))
    assert all(torch.equal(a, b) for a, b in zip(first["exit"], first["entry"]))
    assert all(torch.equal(a, b) for a, b in zip(retry["entry"], first["entry"]))
    assert retry["lrs"] == [lr / 2 for lr in first["lrs"]]
    assert not retry["res"].diverged and retry["res"].steps == 8
    assert s.retried and not s.fallback and len(s.divergence) == 1 and s.train_steps == 8
    with torch.no_grad():  # the retry trained: no longer plain removal
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_divergence_twice_falls_back_to_plain_removal(monkeypatch):
    s, calls, model, plain, ids = _run_poisoned(monkeypatch, at={3, 6})  # call 6 = the retry's third step
    calls.pop(0)
    assert len(calls) == 2 and all(c["res"].diverged for c in calls)
    assert s.retried and s.fallback and len(s.divergence) == 2
    with torch.no_grad():  # every fused term is zero again: exactly plain removal
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-6)
    from fusegpt.fusion import fused_linears

    for _, fl in fused_linears(model):
        assert torch.isfinite(fl.effective_weight()).all()
        assert all(float(p.abs().sum()) == 0 for p in fl.lora_parameters()[1:])  # LoRA B zero again


def test_trainer_restores_parameters_changed_by_earlier_steps():
    lin = torch.nn.Linear(4, 4)

    class R:  # a minimal runner stand-in: forward_blocks applies the linear
        device = CPU
        batch_size = 2
        macs = 0.0

        def forward_blocks(self, blocks, kinds, x):
            return blocks[0](x)

    before = lin.weight.detach().clone()
    seen = []

    def loss_fn(out, y):  # NaN at the 3rd step, after two optimizer steps
        seen.append(lin.weight.detach().clone())
        loss = (out - y).pow(2).mean()
        return loss * float("nan") if len(seen) == 3 else loss

    x, y = torch.randn(4, 3, 4), torch.randn(4, 3, 4)
    res = train_group(R(), [lin], ["full_attention"], x, y, [ParamGroup("w", [lin.weight], 1e-1)],
                      TrainSettings(epochs=2, batch_size=2), loss_fn=loss_fn)
    assert res.steps == 2 and res.nonfinite and res.restored
    assert not torch.equal(seen[2], before)  # the steps did change the weight ...
    assert torch.equal(lin.weight, before)  # ... and it is back


def _params_after(train, epochs):
    model = tiny_model("llama", 6)
    rep = compress(model, _cfg(remove=1, train=train, consolidate=False, epochs=epochs, batch_size=2, coef_lr=1e-2,
                               lr=1e-2), calib_ids=random_ids(8, 16))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, rep


def _kind(name):
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("coef"):
        return "coef"
    if leaf.startswith("lora_"):
        return "lora"
    return "norm" if "norm" in name else "base"


@pytest.mark.parametrize("train", ["coef", "coef+lora", "full"])
def test_train_mode_freezes_what_it_should(train):
    """The same run with 0 and with 4 epochs (same seed, same injection): coef moves only coefficients; coef+lora
    moves coefficients, LoRA and norms but no base weight; full moves coefficients and every block weight."""
    init, r0 = _params_after(train, 0)
    trained, r1 = _params_after(train, 4)
    assert r0.removed == r1.removed and init.keys() == trained.keys()
    moved = {"coef": False, "lora": False, "norm": False, "base": False}
    for name, p in trained.items():
        moved[_kind(name)] |= not torch.equal(p, init[name])
    want = {"coef": {"coef": True, "lora": False, "norm": False, "base": False},
            "coef+lora": {"coef": True, "lora": True, "norm": True, "base": False},
            "full": {"coef": True, "lora": False, "norm": True, "base": True}}[train]
    assert moved == want
    # LoRA exists only where it trains (coef+lora): coef and full fuse without it (a LoRA that never trains would
    # still be formed and differentiated at every step)
    assert any(_kind(n) == "lora" for n in init) == (train == "coef+lora")


def test_cached_inputs_after_a_fusion_step_equal_recomputation():
    """Iterative FuseGPT keeps both activation caches across steps (the scoring one holds every block's input,
    the calibration one the group inputs); every entry it hands out at step 2, after the fusion and removal of
    step 1, must equal a fresh cache computed on the model as it is at that moment."""
    import unittest.mock as um

    ids = random_ids(8, 16)
    model = tiny_model("llama", 8)
    real_get = ActivationCache.get
    checked = []

    def spy(self, i):
        out = real_get(self, i)
        fresh = real_get(ActivationCache(self.runner, ids[: self.shape[0]]), i)
        checked.append((self.shape[0], i, torch.equal(out, fresh)))
        return out

    with um.patch.object(ActivationCache, "get", spy):
        rep = compress(model, _cfg(remove=2, mode="iterative", group_size=3, consolidate=True), calib_ids=ids)
    assert len(rep.steps) == 2
    assert {n for n, _, _ in checked} == {4, 8}  # both caches were read
    assert len([1 for n, i, _ in checked if n == 4]) >= 2 * 7  # MI read every block's input at both steps
    assert all(ok for _, _, ok in checked), [c for c in checked if not c[2]]


def test_config_validation():
    import dataclasses

    with pytest.raises(ConfigError, match="sparsity"):
        CompressConfig(sparsity=1.0).validate()
    with pytest.raises(ConfigError, match="every block"):
        CompressConfig(remove=6).validate(6)
    with pytest.raises(ConfigError, match="score-samples"):
        CompressConfig(nsamples=4, score_samples=8).validate()
    with pytest.raises(ConfigError, match="unknown config keys"):
        CompressConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="presets: cpu, paper"):
        CompressConfig.from_preset("fast")
    assert num_removals(CompressConfig(sparsity=0.25), 30) == 8
    assert num_removals(CompressConfig(sparsity=0.1), 30) == 3
    paper = CompressConfig.from_preset("paper")
    assert (paper.loss, paper.epochs, paper.group_size, paper.coef_rank, paper.lora_rank, paper.coef_lr) == \
        ("kl-batch", 20, 7, 128, 128, 1e-3)
    assert (paper.target, paper.final_epochs) == ("current", 0)  # the reference's loop
    cpu = CompressConfig.from_preset("cpu")
    assert (cpu.target, cpu.loss, cpu.epochs, cpu.final_epochs, cpu.final_lr, cpu.nsamples, cpu.final_nsamples) == \
        ("dense", "nmse", 1, 1, 1e-3, 128, 256)
    assert (cpu.group_size, cpu.dtype, cpu.compute_dtype) == (3, "auto", "auto")
    # its final stage's windows keep their ratio to --nsamples when only that is given
    assert CompressConfig.from_preset("cpu", nsamples=8).final_nsamples == 16
    assert CompressConfig.from_preset("cpu", nsamples=8, final_nsamples=0).final_nsamples == 0
    # the preset's final stage yields to what cannot run it (with a warning), an explicit request does not
    assert CompressConfig.from_preset("cpu", offload="disk").validate().final_epochs == 0
    assert CompressConfig.from_preset("cpu", lora_rank=0).validate().final_epochs == 0
    with pytest.raises(ConfigError, match="offload disk"):
        CompressConfig.from_preset("cpu", offload="disk", final_epochs=3).validate()
    # what was set over the preset is known to the run (plan.offload_decision), yet no setting of it
    mine = CompressConfig.from_preset("cpu", final_epochs=1, nsamples=8)
    assert mine.overrides == ("final_epochs", "nsamples") and cpu.overrides == ()
    assert mine == dataclasses.replace(cpu, nsamples=8, final_nsamples=16) and "overrides" not in mine.to_dict()
    assert CompressConfig.from_dict(mine.to_dict()) == mine
    assert dataclasses.replace(mine, epochs=2).overrides == mine.overrides


def test_distillation_runs_without_dropout():
    """The teacher runs in eval mode; the student must too, even when the model's config has dropout. With zero
    learning rates, the training loss equals the group loss measured without gradients."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config("llama", 6)
    cfg.attention_dropout = 0.5
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rep = compress(model, _cfg(remove=1, epochs=1, lr=0.0, coef_lr=0.0, nsamples=8, score_samples=8,
                               shuffle=False), calib_ids=random_ids(8, 16))
    s = rep.steps[0]
    assert s.epoch_losses[0] == pytest.approx(s.loss_before, rel=1e-5)


@pytest.mark.parametrize("mode", ["oneshot", "iterative"])
def test_score_plot_marks_every_removed_block_in_order(mode, tmp_path):
    from fusegpt.pipeline import score_rows
    from fusegpt.plots import plot_scores

    rep = compress(tiny_model("llama", 8), _cfg(remove=3, mode=mode, epochs=0), calib_ids=random_ids(8, 16))
    rows = score_rows(rep.steps)
    assert len(rows) == (1 if mode == "oneshot" else 3)
    marked = [m for _, _, ms in rows for m in ms]
    assert marked == [(1, rep.removed[0]), (2, rep.removed[1]), (3, rep.removed[2])]
    assert plot_scores(rows, 8, tmp_path / "mi.png").stat().st_size > 1000


@pytest.mark.parametrize("max_resident,disk", [(3, False), (4, False), (5, True)])
def test_bounded_cache_equals_unbounded_and_stays_bounded(max_resident, disk, tmp_path):
    """Entries recomputed from checkpoints are bit-identical to a cache that keeps everything; at most
    max_resident entries are ever held; on disk, the files go with truncate/close."""
    model = tiny_model("llama", 10)
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 16, device=CPU, batch_size=2)
    ids = random_ids(3, 16)
    full = ActivationCache(runner, ids)
    small = ActivationCache(runner, ids, max_resident=max_resident, disk=tmp_path / "act" if disk else None)
    for i in [10, 0, 1, 2, 7, 3, 9, 4, 5, 6, 8, 10, 2]:  # scoring's sweep, then random access
        assert torch.equal(small.get(i), full.get(i)), i
        assert small.resident <= max_resident
    assert small.computed_blocks > 10  # it did recompute ...
    ad.remove_blocks([4])
    full.truncate(5)
    small.truncate(5)
    for i in [9, 3, 6]:  # ... and stays exact after a removal
        assert torch.equal(small.get(i), full.get(i)), i
    assert small.entry_bytes() == 3 * 16 * 64 * 4
    small.close()
    if disk:
        assert list((tmp_path / "act").iterdir()) == []


def test_cache_in_compute_dtype():
    model = tiny_model("llama", 6)
    runner = Runner.for_model(get_adapter(model), 16, device=CPU, batch_size=2, compute_dtype=torch.bfloat16)
    cache = ActivationCache(runner, random_ids(2, 16), dtype=torch.bfloat16, max_resident=3)
    assert cache.get(4).dtype == torch.bfloat16 and cache.entry_bytes() == 2 * 16 * 64 * 2


@pytest.mark.parametrize("extra", [dict(cache_entries=3), dict(cache_entries=3, offload="disk")])
def test_bounded_and_disk_caches_do_not_change_the_result(extra):
    """The memory policy must not change the math: same blocks, bit-identical weights."""
    ids = random_ids(8, 16)
    runs = []
    for kw in (dict(cache_entries=0), extra):
        model = tiny_model("llama", 8)
        rep = compress(model, _cfg(remove=2, mode="iterative", **kw), calib_ids=ids)
        runs.append((rep.removed, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (r0, w0), (r1, w1) = runs
    assert r0 == r1 and w0.keys() == w1.keys()
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


def test_gradient_checkpointing_does_not_change_the_result():
    ids = random_ids(8, 16)
    runs = []
    for gc in ("off", "on"):
        model = tiny_model("llama", 8)
        rep = compress(model, _cfg(remove=1, grad_checkpoint=gc, consolidate=False), calib_ids=ids)
        runs.append((rep, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (r0, w0), (r1, w1) = runs
    assert r0.memory["predicted_over_baseline"]["grad_checkpoint"] is False
    assert r1.memory["predicted_over_baseline"]["grad_checkpoint"] is True
    assert r0.removed == r1.removed and r0.steps[0].epoch_losses == r1.steps[0].epoch_losses
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


@pytest.mark.parametrize("train,coef", [("coef+lora", "lowrank"), ("coef", "vector"), ("full", "matrix")])
def test_memory_formula_counts_the_trainable_parameters(train, coef):
    """The formula's trainable-parameter count equals what distillation really trains."""
    from fusegpt.fusion import inject_donor
    from fusegpt.memory import trainable_params
    from fusegpt.methods.fusegpt import param_groups

    model = tiny_model("qwen2", 6)  # q/k/v biases
    ad = get_adapter(model)
    blocks = list(ad.blocks)
    lins = [(m.out_features, m.in_features, m.bias is not None) for m in ad.block_linears(blocks[1]).values()]
    norms = sum(p.numel() for n, p in blocks[1].named_parameters() if "norm" in n)
    inject_donor(ad, blocks[0], blocks[1:4], coef_kind=coef, coef_rank=4, lora_rank=0 if train == "full" else 8)
    real = sum(p.numel() for g in param_groups(blocks[1:4], train, 1e-2, 1e-4) for p in g.params)
    assert 3 * trainable_params(lins, norms, coef=coef, coef_rank=4, lora_rank=8, train=train) == real


def test_memory_formula_does_not_depend_on_depth():
    from fusegpt.memory import estimate_memory

    kw = dict(n=128, s=8, t=1024, hidden=576, intermediate=1536, heads=9, group=7, batch=4, cache_entries=4,
              cache_bytes=4,
              offload="cpu", trainable=18_000_000, receiver_linear_params=7 * 3_500_000, largest_linear=884_736)
    est = estimate_memory(**kw, grad_checkpoint=False)
    assert est.cache == 4 * (128 + 8) * 1024 * 576 * 4  # R x (N + S) x T x H x bytes
    assert est.group == 128 * 1024 * 576 * 4
    assert est.activations_per_token_block == (9 * 576 + 4 * 1536) * 4
    on = estimate_memory(**kw, grad_checkpoint=True)
    assert on.training < est.training and on.cache == est.cache
    disk = estimate_memory(**{**kw, "offload": "disk"}, grad_checkpoint=True, block_bytes=14_000_000)
    assert disk.cache == 128 * 1024 * 576 * 4 < on.cache
    assert disk.group == est.group + 9 * 14_000_000  # the loaded span (G + 1) and the donor
    # the final stage: F blocks train at once (the training term with F for G, LoRA + norms), plus the embedded
    # windows and one chunk of logit-KL logits; the peak takes it when it is the largest phase
    fin = dict(final_blocks=22, final_trainable=22 * 700_000, vocab=49152)  # one block's linears: 3.5M (W / G)
    f_off = estimate_memory(**kw, **fin, grad_checkpoint=False)
    tokens, att = 4 * 1024, 4 * 9 * 1024 * 1024 * 4
    assert f_off.final == (20 * 22 * 700_000 + 22 * (tokens * est.activations_per_token_block + att + 4 * 3_500_000)
                           + 3 * att + 16 * 884_736 + 128 * 1024 * 576 * 4 + 6 * 512 * 49152 * 4)
    assert f_off.total == f_off.cache + max(f_off.group + f_off.training, f_off.scoring, f_off.final)
    assert f_off.final > f_off.group + f_off.training and f_off.total > est.total
    f_on = estimate_memory(**kw, **fin, grad_checkpoint=True)
    assert f_on.final < f_off.final and est.final == 0
    # --final-batch-size 1: the final stage's activations and attention for one window per step, the group's as before
    f_one = estimate_memory(**kw, **fin, grad_checkpoint=False, final_batch=1)
    assert f_one.training == f_off.training
    per_block = 3 * 1024 * est.activations_per_token_block + 3 * att // 4  # three windows fewer per block
    assert f_off.final - f_one.final == 22 * per_block + 3 * 3 * att // 4
    # --final-topk 64: the teacher's 64 log-probabilities and ids and its tail's mass per token of the final windows
    f_top = estimate_memory(**kw, **fin, grad_checkpoint=False, final_topk=64)
    assert f_top.final - f_off.final == 128 * 1024 * (8 * 64 + 4)
    # a final loss on hidden states reads no logits (vocab 0); a group loss that does (logit-kl) holds one chunk
    f_hid = estimate_memory(**kw, **{**fin, "vocab": 0}, grad_checkpoint=False)
    assert f_off.final - f_hid.final == 6 * 512 * 49152 * 4 and f_hid.training == f_off.training
    kl = estimate_memory(**kw, grad_checkpoint=False, head_vocab=49152)
    assert kl.training - est.training == 6 * 512 * 49152 * 4 and kl.final == 0


def test_memory_plan_counts_logits_only_for_losses_that_read_them():
    """The run's memory plan gives the formula the vocabulary only where the group or final loss reads logits."""
    from fusegpt.api import _memory_plan

    ad = get_adapter(tiny_model("llama", 6))
    v = ad.model.lm_head.out_features

    def plan(**kw):
        return _memory_plan(ad, CompressConfig(remove=1, sparsity=None, nsamples=8, seqlen=16, batch_size=4, **kw),
                            None).inputs

    assert plan()["head_vocab"] == 0 and "vocab" not in plan()
    assert plan(loss="logit-kl")["head_vocab"] == v
    assert plan(aux_loss="logit-kl", aux_weight=0.5)["head_vocab"] == v
    assert plan(final_epochs=1)["vocab"] == v  # the final stage's default loss is logit-kl
    assert plan(final_epochs=1, final_loss="mse")["vocab"] == 0


def test_heap_trimming_only_when_on_and_only_on_growth(monkeypatch):
    """malloc_trim runs inside heap_trimming(True) only, and only once the process has grown by the set amount
    over the level of the last trim (a step that allocates its working set again does not trim again)."""
    from fusegpt import device

    calls = []
    rss = [1000 << 20]

    class Lib:
        def malloc_trim(self, pad):
            calls.append(rss[0])

    monkeypatch.setattr(device, "_libc", lambda: Lib())
    monkeypatch.setattr(device, "current_rss_bytes", lambda: rss[0])
    device.trim_heap()
    assert calls == []  # off by default
    with device.heap_trimming(True):
        for mib in (1000, 1100, 1200, 1300, 1000, 1290, 1300, 1600):
            rss[0] = mib << 20
            device.trim_heap()
    assert calls == [1300 << 20, 1600 << 20]
    rss[0] = 9000 << 20
    device.trim_heap()
    assert len(calls) == 2  # off again after the context


def test_large_allocations_reused_only_inside_the_context_and_only_when_not_memory_bound(monkeypatch):
    """reuse_large_allocations(True) stops glibc from mapping large blocks afresh (M_MMAP_MAX 0, no top trimming)
    and restores the defaults + trims on exit; compress turns it on for runs that are not memory-bound and off
    for checkpointed ones (where heap_trimming is on instead)."""
    import fusegpt.api as api
    from fusegpt import device

    calls = []

    class Lib:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(device, "_libc", lambda: Lib())
    with device.reuse_large_allocations(False) as applied:
        assert applied is False and calls == []
    with device.reuse_large_allocations(True) as applied:
        assert applied is True
        assert calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
        with device.reuse_large_allocations(True):  # nested (an evaluation inside a run): the outer one restores
            pass
        assert len(calls) == 2
    assert calls[2:] == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("trim", 0)]

    seen = []
    real = device.reuse_large_allocations

    def spy(on):
        seen.append(bool(on))
        return real(on)

    monkeypatch.setattr(api, "reuse_large_allocations", spy)
    ids = random_ids(8, 16)
    for gc in ("off", "on"):
        compress(tiny_model("llama", 6), _cfg(remove=1, grad_checkpoint=gc, consolidate=False), calib_ids=ids)
    assert seen == [True, False]
