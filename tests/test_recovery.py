"""Options for recovering more: head losses, warm-up/clipping, norm folding, dense targets (each against brute
force or against the run it must equal)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fusegpt.activations import ActivationCache, Runner
from fusegpt.adapters import get_adapter
from fusegpt.api import compress
from fusegpt.config import CompressConfig, ConfigError
from fusegpt.distill import LossHead, build_loss, get_loss, lr_factor
from fusegpt.distill import trainer as trainer_mod
from fusegpt.fusion import inject_donor
from fusegpt.fusion.math import fold_gain
from fusegpt.memory import estimate_memory
from fusegpt.methods.fusegpt import (
    ORDERS, dense_boundary, dense_target_count, joint_spans, pick_blocks, plan_boundaries,
)

from conftest import random_ids, tiny_model

CPU = torch.device("cpu")
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"]


def _cfg(**kw):
    base = dict(remove=2, group_size=3, epochs=2, nsamples=8, score_samples=4, seqlen=16, coef_rank=4,
                lora_rank=4, batch_size=4, compute_dtype="fp32")
    base.update(kw)
    return CompressConfig(**base)


def _head(model, chunk=512):
    ad = get_adapter(model)
    return LossHead(ad.final_norm, ad.head, chunk=chunk)


# ---- losses --------------------------------------------------------------------------------------------------
def test_nmse_is_per_token_normalised_squared_error():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * torch.arange(1, 9)
    want = torch.stack([((s[b, i] - t[b, i]) ** 2).sum() / (t[b, i] ** 2).sum()
                        for b in range(2) for i in range(5)]).mean()
    torch.testing.assert_close(get_loss("nmse")(s, t), want)
    assert float(get_loss("nmse")(t, t)) == 0.0


@pytest.mark.parametrize("rows", [1, 3, None])  # rows per block of the KL's elementwise passes (None: the default)
@pytest.mark.parametrize("chunk", [3, 7, 512])
def test_logit_kl_equals_full_logits_kl_with_its_gradient(chunk, rows, monkeypatch):
    from fusegpt.distill import losses

    model = tiny_model("llama", 2)
    if rows is not None:
        monkeypatch.setattr(losses, "KL_BLOCK_BYTES", rows * 4 * model.config.vocab_size)
    h = _head(model, chunk)
    t = torch.randn(2, 5, 64)
    s = (t + 0.3 * torch.randn_like(t)).requires_grad_(True)
    got = get_loss("logit-kl", h)(s, t)
    (g_got,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    ls = F.log_softmax(model.lm_head(model.model.norm(s2)), -1).flatten(0, 1)
    lt = F.log_softmax(model.lm_head(model.model.norm(t)), -1).flatten(0, 1)
    want = (lt.exp() * (lt - ls)).sum(-1).mean()
    (g_want,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert float(get_loss("logit-kl", h)(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the head stays frozen


def test_logit_kl_row_blocks_change_no_gradient_in_bf16(monkeypatch):
    """The KL's elementwise passes a few rows at a time compute each row as the whole chunk did: the same bf16
    gradient to the bit, the loss up to the order of the fp32 sum."""
    from fusegpt.distill import losses

    model = tiny_model("llama", 2).to(torch.bfloat16)
    h = _head(model, 512)
    t = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    s = (t + 0.3 * torch.randn_like(t)).requires_grad_(True)
    got = {}
    for name, block in (("whole", 2**62), ("rows", 4 * model.config.vocab_size)):
        monkeypatch.setattr(losses, "KL_BLOCK_BYTES", block)
        loss = get_loss("logit-kl", h)(s, t)
        got[name] = (loss.detach(), torch.autograd.grad(loss, s)[0])
    assert torch.equal(got["whole"][1], got["rows"][1]) and got["rows"][1].dtype == torch.bfloat16
    torch.testing.assert_close(got["whole"][0], got["rows"][0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk,k", [(3, 5), (7, 17), (512, 1)])
def test_logit_kl_against_a_top_k_teacher_is_the_kl_of_the_coarsened_distributions(chunk, k):
    """A precomputed top-k teacher: the KL over the k + 1 outcomes (the teacher's top k tokens, the rest as one),
    with its autograd gradient; with k = the vocabulary it is the exact logit KL."""
    from fusegpt.distill.losses import TeacherTopK, teacher_topk

    model = tiny_model("llama", 2)
    h = _head(model, chunk)
    t = torch.randn(2, 5, 64)
    s = (t + 0.3 * torch.randn_like(t)).requires_grad_(True)
    top = teacher_topk(t, h, k)
    assert isinstance(top, TeacherTopK) and top.logp.shape == top.idx.shape == (2, 5, k) and top.shape == (2, 5)
    got = get_loss("logit-kl", h)(s, top)
    (g_got,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    ls = F.log_softmax(model.lm_head(model.model.norm(s2)), -1).flatten(0, 1)
    lt = F.log_softmax(model.lm_head(model.model.norm(t)), -1).flatten(0, 1)
    idx = lt.topk(k, -1).indices
    assert torch.equal(top.idx.flatten(0, 1).long(), idx)
    mask = torch.zeros_like(lt, dtype=torch.bool).scatter_(-1, idx, True)
    pt, lq = lt.gather(-1, idx), ls.gather(-1, idx)
    pt_tail = torch.logsumexp(lt.masked_fill(mask, float("-inf")), -1)
    lq_tail = torch.logsumexp(ls.masked_fill(mask, float("-inf")), -1)
    want = ((pt.exp() * (pt - lq)).sum(-1) + pt_tail.exp() * (pt_tail - lq_tail)).mean()
    (g_want,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # coarsening loses information
        assert float(want) < float(get_loss("logit-kl", h)(s, t))
    vocab = model.lm_head.out_features
    full = teacher_topk(t, h, vocab + 5)  # every token: the exact KL (and k is capped at the vocabulary)
    assert full.logp.shape[-1] == vocab and torch.isinf(full.log_tail).all()
    s3 = s.detach().clone().requires_grad_(True)
    exact = get_loss("logit-kl", h)(s3, full)
    (g_exact,) = torch.autograd.grad(exact, s3)
    s4 = s.detach().clone().requires_grad_(True)
    ls4 = F.log_softmax(model.lm_head(model.model.norm(s4)), -1).flatten(0, 1)
    want_exact = (lt.exp() * (lt - ls4)).sum(-1).mean()
    (g_want_exact,) = torch.autograd.grad(want_exact, s4)
    torch.testing.assert_close(exact, want_exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_exact, g_want_exact, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_top_k_kl_keeps_a_tiny_student_tail_exact():
    """Where the student's top-k mass leaves almost nothing (1 - sum would lose every digit), the tail comes from
    the other tokens' log-sum-exp: KL and gradient match an fp64 reference."""
    from fusegpt.distill.losses import TeacherTopK, _topk_kl

    torch.manual_seed(0)
    z = torch.randn(6, 50, dtype=torch.float64)
    z[:3, :4] += 25.0  # rows 0-2: the top 4 tokens hold all but ~1e-9 of the student's mass
    zt = torch.randn(6, 50, dtype=torch.float64)
    lt = F.log_softmax(zt, -1)
    top = lt.topk(4, -1)
    mask = torch.zeros_like(lt, dtype=torch.bool).scatter_(-1, top.indices, True)
    t = TeacherTopK(top.values.float(), top.indices.int(),
                    torch.logsumexp(lt.masked_fill(mask, float("-inf")), -1).float())
    zz = z.clone().requires_grad_(True)
    ls = F.log_softmax(zz, -1)
    tail = torch.logsumexp(ls.masked_fill(mask, float("-inf")), -1)
    want = (top.values.exp() * (top.values - ls.gather(-1, top.indices))).sum() + (
        t.log_tail.double().exp() * (t.log_tail.double() - tail)).sum()
    (g_want,) = torch.autograd.grad(want, zz)
    kl, d = _topk_kl(F.log_softmax(z.float(), -1), t, True)
    torch.testing.assert_close(kl.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.double(), g_want, rtol=1e-4, atol=1e-6)


def test_mse_norm_and_aux_loss():
    model = tiny_model("llama", 2)
    h = _head(model)
    s, t = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    want = F.mse_loss(model.model.norm(s), model.model.norm(t))
    torch.testing.assert_close(get_loss("mse-norm", h)(s, t), want)
    both = build_loss("mse", aux="mse-norm", aux_weight=0.5, head=h)(s, t)
    torch.testing.assert_close(both, F.mse_loss(s, t) + 0.5 * want)
    with pytest.raises(ValueError, match="head"):
        get_loss("logit-kl")


def test_lr_warmup_then_cosine():
    assert [lr_factor(i, 10, 0) for i in range(10)] == [0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    f = [lr_factor(i, 10, 4) for i in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[4:] == sorted(f[4:], reverse=True) and f[-1] > 0


def test_clipping_and_warmup_reach_the_optimizer(monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        calls.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    seen = []
    real_factor = trainer_mod.lr_factor
    monkeypatch.setattr(trainer_mod, "lr_factor", lambda s, t, w: seen.append(w) or real_factor(s, t, w))
    rep = compress(tiny_model("llama", 6), _cfg(remove=1, clip_grad=0.5, warmup=0.25), calib_ids=random_ids(8, 16))
    assert rep.steps[0].train_steps == 4 and calls == [0.5] * 4
    assert set(seen) == {1}  # 0.25 x 4 steps


@pytest.mark.parametrize("bad", [dict(warmup=1.0), dict(clip_grad=-1), dict(aux_weight=1.0),
                                 dict(aux_loss="nope", aux_weight=1.0), dict(target="teacher"), dict(order="xyz"),
                                 dict(min_gap=0), dict(final_epochs=1, lora_rank=0),
                                 dict(final_epochs=1, offload="disk"), dict(final_epochs=-1)])
def test_recovery_options_are_validated(bad):
    with pytest.raises(ConfigError):
        _cfg(**bad).validate()


# ---- norm folding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_input_gain_is_what_the_norm_multiplies(family):
    """gain x (x / rms(x)) must be the block's own norm output, for every linear the adapter says a norm feeds."""
    model = tiny_model(family, 3)
    ad = get_adapter(model)
    block = ad.blocks[1]
    x = torch.randn(2, 4, model.config.hidden_size)
    assert ad.linear_norms, "every adapter names the norms that feed its linears"
    for name, norm in ad.linear_norms.items():
        mod = block.get_submodule(norm)
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(ad.input_gain(block, name) * unit, mod(x), rtol=1e-5, atol=1e-6)


def test_fold_gain_gives_the_donor_its_own_norm():
    w, n = torch.randn(6, 5), torch.randn(3, 5)
    g_d, g_r = torch.randn(5), torch.rand(5) + 0.5
    torch.testing.assert_close((g_r * n) @ fold_gain(w, g_d, g_r).T, (g_d * n) @ w.T)
    tiny = torch.tensor([1.0, 1e-9, -1e-9, 2.0, 1.0])
    assert torch.isfinite(fold_gain(w, g_d, tiny)).all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_folded_injection_is_the_identity_at_start(family):
    model = tiny_model(family, 4)
    ad = get_adapter(model)
    ids = random_ids(2, 8)
    with torch.no_grad():
        before = model(ids).logits
        inject_donor(ad, ad.blocks[1], [ad.blocks[0], ad.blocks[2]], coef_kind="lowrank", coef_rank=4, lora_rank=4,
                     generator=torch.Generator().manual_seed(0), fold_norms=True)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_fold_norms_runs_and_changes_the_result():
    ids = random_ids(8, 16)
    a = compress(tiny_model("llama", 6), _cfg(blocks=[2, 3]), calib_ids=ids)
    b = compress(tiny_model("llama", 6), _cfg(blocks=[2, 3], fold_norms=True), calib_ids=ids)
    assert a.steps[0].loss_before == b.steps[0].loss_before  # identity at start either way
    assert a.steps[0].loss_after != b.steps[0].loss_after


# ---- dense targets ---------------------------------------------------------------------------------------------
def test_plan_boundaries_replays_the_windows():
    # remove 5 then 4 of 10 blocks with G = 3: windows [3, 4, 6] (span 3..6) then [2, 3, 5] of the 9 left
    assert dense_boundary(list(range(10)), 6, 10) == 7
    assert dense_boundary(list(range(10)), 9, 10) == 10
    assert plan_boundaries([5, 4], 10, 3) == [7]  # both spans end right before original block 7
    assert plan_boundaries([9], 10, 3) == [10]


def test_dense_target_count_and_memory():
    assert dense_target_count(_cfg(remove=3, mode="oneshot", target="dense"), 8) == 3
    assert dense_target_count(_cfg(remove=3, mode="iterative", target="dense"), 8) == 8
    assert dense_target_count(_cfg(remove=3, target="current"), 8) == 0
    kw = dict(n=4, s=2, t=8, hidden=16, intermediate=32, heads=2, group=3, batch=2, cache_entries=4, cache_bytes=4,
              offload="cpu", trainable=100, receiver_linear_params=1000, largest_linear=100, grad_checkpoint=False)
    assert estimate_memory(**kw, targets=3).cache - estimate_memory(**kw).cache == 3 * 4 * 8 * 16 * 4


def _dense_out(model, ids, boundary):
    runner = Runner.for_model(get_adapter(model), ids.shape[1], device=CPU)
    return ActivationCache(runner, ids).get(boundary)


@pytest.mark.parametrize("mode", ["oneshot", "iterative"])
def test_dense_target_first_step_equals_current_and_later_steps_aim_at_the_dense_model(mode, monkeypatch):
    ids = random_ids(8, 16)
    ref = tiny_model("llama", 8)
    targets_seen = []
    import fusegpt.methods.fusegpt as fg

    real = fg.train_group

    def spy(runner, blocks, kinds, x, y, *a, **k):
        targets_seen.append(y.clone())
        return real(runner, blocks, kinds, x, y, *a, **k)

    monkeypatch.setattr(fg, "train_group", spy)
    cur = compress(tiny_model("llama", 8), _cfg(remove=3, mode=mode), calib_ids=ids)
    n_cur = len(targets_seen)
    dense = compress(tiny_model("llama", 8), _cfg(remove=3, mode=mode, target="dense"), calib_ids=ids)
    assert n_cur == 3 and len(targets_seen) == 6
    # step 0: the model is still dense, so both targets are the same tensor values
    torch.testing.assert_close(targets_seen[3], targets_seen[0], rtol=1e-6, atol=1e-6)
    assert cur.steps[0].loss_before == pytest.approx(dense.steps[0].loss_before, rel=1e-6)
    # every dense step's target is the untouched model's hidden state at the span's boundary
    orig = list(range(8))
    for step, srep in enumerate(dense.steps):
        p = orig.index(srep.removed)
        span_end = max(orig.index(srep.group[-1]), p)
        b = dense_boundary(orig, span_end, 8)
        torch.testing.assert_close(targets_seen[3 + step], _dense_out(ref, ids, b), rtol=1e-5, atol=1e-5)
        orig.pop(p)
    assert not torch.allclose(targets_seen[5], targets_seen[2])  # the later targets differ from the pruned ones


def test_dense_target_with_disk_offload_equals_memory(tmp_path):
    ids = random_ids(8, 16)
    runs = []
    for kw in (dict(), dict(offload="disk")):
        model = tiny_model("llama", 8)
        rep = compress(model, _cfg(remove=2, target="dense", **kw), calib_ids=ids,
                       checkpoint_dir=tmp_path / f"run{len(runs)}")
        runs.append((rep.removed, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (r0, w0), (r1, w1) = runs
    assert r0 == r1 and all(torch.equal(w0[n], w1[n]) for n in w0)


# ---- selection orders ------------------------------------------------------------------------------------------
def test_pick_blocks_prefers_blocks_apart():
    scores = {0: 5.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 4.0, 5: 0.4}
    assert pick_blocks(scores, 3) == [1, 2, 3]
    assert pick_blocks(scores, 3, min_gap=2) == [1, 3, 5]
    assert pick_blocks(scores, 4, min_gap=2) == [1, 3, 5, 2]  # too few qualify: the lowest of the rest fill up
    assert pick_blocks(scores, 1, removed=[2], min_gap=2) == [5]


@pytest.mark.parametrize("order", ["bi", "nll"])
def test_fusegpt_order_follows_the_scorer(order):
    ids = random_ids(8, 16)
    model = tiny_model("llama", 8)
    runner = Runner.for_model(get_adapter(model), 16, device=CPU)
    scores = ORDERS[order](ActivationCache(runner, ids[:4]), ids[:4], None)
    rep = compress(model, _cfg(remove=2, order=order, mode="oneshot"), calib_ids=ids)
    assert rep.removed == sorted(range(8), key=scores.__getitem__)[:2]
    assert rep.steps[0].scores == pytest.approx(dict(enumerate(scores)))


def test_min_gap_in_both_modes():
    ids = random_ids(8, 16)
    for mode in ("oneshot", "iterative"):
        rep = compress(tiny_model("llama", 10), _cfg(remove=3, mode=mode, min_gap=2, epochs=1), calib_ids=ids)
        r = rep.removed
        assert all(abs(a - b) >= 2 for i, a in enumerate(r) for b in r[:i]), (mode, r)


# ---- final stage -----------------------------------------------------------------------------------------------
def test_final_stage_distils_towards_the_dense_model():
    ids = random_ids(8, 16)
    dense = tiny_model("llama", 8)
    runs = {}
    for name, kw in {"none": {}, "lr0": dict(final_epochs=2, final_lr=0.0),
                     "final": dict(final_epochs=4, final_lr=1e-2)}.items():
        model = tiny_model("llama", 8)
        rep = compress(model, _cfg(remove=2, **kw), calib_ids=ids)
        with torch.no_grad():
            lt = F.log_softmax(dense(ids).logits, -1)
            kl = F.kl_div(F.log_softmax(model(ids).logits, -1), lt, log_target=True, reduction="batchmean")
        runs[name] = (rep, {n: p.detach().clone() for n, p in model.named_parameters()}, float(kl))
    assert "final" not in runs["none"][0].steps[-1].extra
    fin = runs["final"][0].steps[-1].extra["final"]
    assert fin["steps"] == 8 and fin["epoch_losses"][-1] < fin["epoch_losses"][0]
    assert runs["final"][0].steps[-1].seconds["final"] > 0
    w0, w1 = runs["none"][1], runs["lr0"][1]  # lr 0: LoRA B stays 0, the merged model is the one without the stage
    assert w0.keys() == w1.keys() and all(torch.equal(w0[n], w1[n]) for n in w0)
    assert runs["final"][2] < runs["none"][2]  # closer to the dense model's predictions


def test_flop_count_includes_the_lm_head_of_head_losses():
    """A logit-KL group loss runs the LM head for student (forward + input gradient) and teacher (forward) on every
    trained token: the reported training FLOPs exceed the MSE run's by exactly 6 x tokens x hidden x vocabulary."""
    ids = random_ids(8, 16)
    flops = {}
    for loss in ("mse", "logit-kl"):
        model = tiny_model("llama", 6)
        rep = compress(model, _cfg(blocks=[3, 1], loss=loss), calib_ids=ids)
        flops[loss] = rep.flops["train"]
        head = model.lm_head.weight.numel()
    tokens = 2 * 2 * 8 * 16  # removals x epochs x windows x seqlen
    assert flops["logit-kl"] - flops["mse"] == pytest.approx(6 * tokens * head, rel=1e-9)


def test_final_stage_decides_its_checkpointing_on_its_own_memory(monkeypatch):
    """--grad-checkpoint auto: the final stage trains every remaining block at once, so its saving is weighed on
    its own; with a threshold between the group's and the final stage's savings only the final stage checkpoints."""
    from fusegpt import api, memory
    from fusegpt.memory import estimate_memory
    from fusegpt.methods import heal

    ids = random_ids(8, 16)
    cfg = _cfg(final_epochs=1, target="dense")
    model = tiny_model("llama", 6)
    kw = api._memory_plan(get_adapter(model), cfg, None).inputs
    kw = {k: v for k, v in kw.items() if k not in ("grad_checkpoint", "final_checkpoint")}
    off, on = estimate_memory(**kw, grad_checkpoint=False), estimate_memory(**kw, grad_checkpoint=True)
    group_saving, final_saving = off.training - on.training, off.final - on.final
    assert 0 < group_saving < final_saving
    monkeypatch.setattr(memory, "AUTO_CHECKPOINT_BYTES", (group_saving + final_saving) // 2)
    monkeypatch.setattr(api, "available_memory_bytes", lambda device: 1)  # memory is short
    seen = []
    real = heal.train_group

    def spy(runner, *a, **k):
        seen.append(runner.grad_checkpoint)
        return real(runner, *a, **k)

    monkeypatch.setattr(heal, "train_group", spy)
    rep = compress(model, cfg, calib_ids=ids)
    assert seen == [True]  # the final stage checkpointed ...
    bound = rep.memory["bound_over_baseline"]
    assert bound["grad_checkpoint"] is False and bound["final_checkpoint"] is True  # ... the group loop did not


def test_auto_checkpointing_spends_time_only_where_memory_is_short(monkeypatch):
    """--grad-checkpoint auto: a saving above the threshold checkpoints only when the phase would otherwise take
    more than half the memory available; where availability cannot be read, the saving alone decides."""
    from fusegpt import api, memory
    from fusegpt.memory import auto_checkpoint

    big = memory.AUTO_CHECKPOINT_BYTES + 1
    assert not auto_checkpoint(memory.AUTO_CHECKPOINT_BYTES, 10**12, 1)  # saves too little
    assert auto_checkpoint(big, 10**10, None)
    assert not auto_checkpoint(big, 10**10, 2 * 10**10 + 2)  # fits in half of what is free
    assert auto_checkpoint(big, 10**10, 2 * 10**10 - 2)
    cfg = _cfg(final_epochs=1, target="dense")
    monkeypatch.setattr(memory, "AUTO_CHECKPOINT_BYTES", 0)
    plans = {}
    for name, avail in (("short", 1), ("plenty", 1 << 50), ("unknown", None)):
        monkeypatch.setattr(api, "available_memory_bytes", lambda device, a=avail: a)
        rep = compress(tiny_model("llama", 6), cfg, calib_ids=random_ids(8, 16))
        plans[name] = rep.memory["bound_over_baseline"]
    assert plans["short"]["grad_checkpoint"] and plans["short"]["final_checkpoint"]
    assert not plans["plenty"]["grad_checkpoint"] and not plans["plenty"]["final_checkpoint"]
    assert plans["unknown"]["grad_checkpoint"] and plans["unknown"]["final_checkpoint"]
    # data-parallel CPU ranks share the host; weights not loaded yet (the plan) are taken off
    monkeypatch.setattr(api, "available_memory_bytes", lambda device: 10 << 30)
    assert api.available_for_run(torch.device("cpu"), loading=1 << 30, nproc=2) == 4 << 30
    monkeypatch.setattr(api, "available_memory_bytes", lambda device: None)
    assert api.available_for_run(torch.device("cpu")) is None


# ---- joint one-shot (the paper's) ------------------------------------------------------------------------------
def test_joint_spans_merge_overlapping_windows():
    # G = 1: windows {1, 2} (block 2), {3, 4} (4), {4, 5} (5) and {8, 9} (9) -> spans 1..2, 3..5, 8..9
    spans = joint_spans([9, 4, 2, 5], 10, 1)
    assert [s for s, _ in spans] == [[1, 2], [3, 4, 5], [8, 9]]
    assert [m for _, m in spans] == [{2: [1]}, {4: [3], 5: []}, {9: [8]}]  # a removed block never receives


def test_joint_mode_fuses_all_at_once_and_distils_each_span_once(monkeypatch):
    import fusegpt.methods.fusegpt as fg

    calls = []
    real = fg.train_group
    monkeypatch.setattr(fg, "train_group", lambda runner, blocks, *a, **k: calls.append(len(blocks))
                        or real(runner, blocks, *a, **k))
    ids = random_ids(8, 16)
    rep = compress(tiny_model("llama", 10), _cfg(blocks=[2, 4, 9], mode="joint", group_size=1, target="dense"),
                   calib_ids=ids)
    assert rep.removed == [2, 4, 9] and rep.final_layers == 7
    assert calls == [1, 1, 1]  # spans {1,2}, {3,4}, {8,9}: one kept block each, one training each
    assert all(s.train_steps == 4 and s.loss_after < s.loss_before for s in rep.steps)
    calls.clear()
    rep = compress(tiny_model("llama", 10), _cfg(remove=3, mode="joint", group_size=3), calib_ids=ids)
    first = rep.steps[0].scores
    assert set(rep.removed) == set(sorted(first, key=first.get)[:3])  # removed span by span, front to back
    assert len(calls) == len({tuple(s.extra["joint_span"]) for s in rep.steps})
    assert sum(s.train_steps for s in rep.steps) == 4 * len(calls)


def test_final_stage_trains_on_its_own_windows(monkeypatch):
    """--final-nsamples: the group stage keeps its --nsamples windows (same removals and group losses), the final
    stage trains on those plus the extra rows, against the dense model's final hidden states of all of them."""
    from fusegpt.methods import heal

    ids = random_ids(12, 16)
    seen = {}
    real = heal.lora_heal

    def spy(job, **kw):
        seen[len(seen)] = (kw.get("ids"), kw["teacher"].clone())
        return real(job, **kw)

    monkeypatch.setattr(heal, "lora_heal", spy)
    base = compress(tiny_model("llama", 6), _cfg(final_epochs=1, nsamples=8, target="dense"), calib_ids=ids)
    own = compress(tiny_model("llama", 6), _cfg(final_epochs=1, nsamples=8, final_nsamples=12, target="dense"),
                   calib_ids=ids)
    compress(tiny_model("llama", 6), _cfg(final_epochs=1, nsamples=12, target="dense", epochs=0),
             calib_ids=ids)
    assert base.removed == own.removed
    for a, b in zip(base.steps, own.steps):  # the group stage did not change
        assert (a.loss_before, a.loss_after) == (b.loss_before, b.loss_after)
    assert seen[0][0] is None and seen[2][0] is None  # the group stage's windows
    assert torch.equal(seen[1][0], ids[:12])
    assert base.steps[-1].extra["final"]["steps"] == 2 and own.steps[-1].extra["final"]["steps"] == 3
    # the teacher of the 12 windows: the dense model's last hidden states, as a run on all 12 computes them
    assert seen[1][1].shape == seen[2][1].shape == (12, 16, 64)
    torch.testing.assert_close(seen[1][1], seen[2][1])
    with pytest.raises(ValueError, match="final-nsamples"):  # too few rows for the extra windows
        compress(tiny_model("llama", 6), _cfg(final_epochs=1, nsamples=8, final_nsamples=16), calib_ids=ids)
    with pytest.raises(ConfigError, match="final-nsamples"):
        _cfg(final_nsamples=-1).validate()


@pytest.mark.parametrize("mode", ["oneshot", "joint"])
def test_dense_pass_is_timed_and_counted_as_teacher_work(mode):
    """The dense pass over the calibration windows (and the final stage's extra windows) runs before the first
    removal: its seconds and FLOPs are the first step's teacher phase (as the plan predicts them), not time the
    report leaves unnamed and FLOPs its fraction of peak leaves out."""
    ids = random_ids(12, 16)
    model = tiny_model("llama", 6)
    ad = get_adapter(model)
    dense = 12 * 16 * sum(ad.block_macs_per_token(b, 16) for b in ad.blocks)  # 8 + 4 windows through every block
    rep = compress(model, _cfg(mode=mode, final_epochs=1, nsamples=8, final_nsamples=12, target="dense"),
                   calib_ids=ids)
    assert rep.steps[0].seconds["teacher"] > 0
    assert rep.flops["teacher"] >= 2 * dense


def _final_stage_pair(epochs: int = 2, lr: float | None = 1e-2, **change):
    """The same run twice on the same windows, the second with ``change`` to its final stage (``epochs`` of it):
    the group stage must not notice (same blocks, same group losses and steps). Returns both reports."""
    ids = random_ids(8, 16)
    kw = {"final_epochs": epochs, "target": "dense", **({} if lr is None else {"lr": lr})}
    base = compress(tiny_model("llama", 6), _cfg(**kw), calib_ids=ids)
    other = compress(tiny_model("llama", 6), _cfg(**kw, **change), calib_ids=ids)
    assert base.removed == other.removed
    for a, b in zip(base.steps, other.steps):
        assert (a.loss_before, a.loss_after, a.train_steps) == (b.loss_before, b.loss_after, b.train_steps)
    return base, other


def test_final_stage_with_a_top_k_teacher(monkeypatch):
    """--final-topk: the teacher's top-k distributions are computed once (one head pass over the final windows)
    and the stage spends one head pass per step fewer; the group stage is unchanged and the stage still lowers
    its loss (the KL over the k + 1 outcomes)."""
    from fusegpt.methods import heal

    made = []
    real = heal.teacher_topk
    monkeypatch.setattr(heal, "teacher_topk", lambda *a, **kw: made.append(a[2]) or real(*a, **kw))
    base, top = _final_stage_pair(final_topk=8)
    assert made == [8]  # once in the top-k run, not per epoch; never in the base run
    fb, ft = base.steps[-1].extra["final"], top.steps[-1].extra["final"]
    assert fb["steps"] == ft["steps"] == 4 and ft["nll_before"] == fb["nll_before"]
    assert ft["epoch_losses"][1] < ft["epoch_losses"][0] < fb["epoch_losses"][0]  # coarsened: a smaller KL
    assert ft["nll_after"] != fb["nll_after"]
    with pytest.raises(ConfigError, match="final-topk"):
        _cfg(final_topk=-1).validate()


def test_final_stage_with_a_hidden_state_loss():
    """--final-loss nmse: the final stage trains against the dense model's final hidden states (no LM head in the
    step: its FLOPs are the logit KL's less three head passes per trained token), lowers that loss, and leaves the
    group stage unchanged; a top-k teacher with it is refused."""
    from fusegpt.adapters import get_adapter

    kl, hs = _final_stage_pair(final_loss="nmse")
    fk, fh = kl.steps[-1].extra["final"], hs.steps[-1].extra["final"]
    assert fk["steps"] == fh["steps"] == 4 and fh["nll_before"] == fk["nll_before"]
    assert fh["epoch_losses"][1] < fh["epoch_losses"][0]
    assert fh["nll_after"] != fk["nll_after"]
    # 3 head passes x 2 epochs x 8 windows x 16 tokens
    head = 2.0 * 3 * 2 * 8 * 16 * get_adapter(tiny_model("llama", 6)).head_macs_per_token()
    assert kl.flops["train"] - hs.flops["train"] == pytest.approx(head, rel=1e-9)
    with pytest.raises(ConfigError, match="final-loss"):
        _cfg(final_loss="nope").validate()
    with pytest.raises(ConfigError, match="final-topk"):
        _cfg(final_loss="nmse", final_topk=8).validate()


def test_coefficient_only_group_stage_with_a_final_stage(monkeypatch):
    """--train coef with a final stage: the group stage's receivers carry no LoRA (nothing of it is formed or
    differentiated there), the final stage still puts --lora-rank LoRA on every block and lowers its loss, and the
    result is a plain model."""
    import fusegpt.methods.fusegpt as fg
    import fusegpt.methods.heal as heal
    from fusegpt.fusion import FusedLinear

    ranks = []
    real = fg.train_group

    def spy(runner, blocks, kinds, x, y, groups, settings, **kw):
        fused = [m for b in blocks for m in b.modules() if isinstance(m, FusedLinear)]
        ranks.append({0 if m.lora_A is None else m.lora_A.shape[0] for m in fused})
        return real(runner, blocks, kinds, x, y, groups, settings, **kw)

    monkeypatch.setattr(fg, "train_group", spy)
    monkeypatch.setattr(heal, "train_group", spy)
    model = tiny_model("llama", 6)
    rep = compress(model, _cfg(remove=2, train="coef", final_epochs=4, final_lr=1e-2, target="dense", lora_rank=4),
                   calib_ids=random_ids(8, 16))
    assert ranks == [{0}, {0}, {4}]  # two group stages without LoRA, then the final stage's rank-4 LoRA
    final = rep.steps[-1].extra["final"]
    assert final["steps"] == 8 and final["epoch_losses"][-1] < final["epoch_losses"][0]
    assert not any(isinstance(m, FusedLinear) for m in model.modules())


def test_final_batch_size_sets_the_final_stages_steps_only():
    """--final-batch-size: the final stage takes more, smaller steps on the same windows; the group stage keeps
    --batch-size (same removals, same group losses); a negative value is refused."""
    base, small = _final_stage_pair(epochs=1, lr=None, final_batch_size=2)
    assert base.steps[-1].extra["final"]["steps"] == 2 and small.steps[-1].extra["final"]["steps"] == 4
    assert small.steps[-1].extra["final"]["nll_after"] != base.steps[-1].extra["final"]["nll_after"]
    with pytest.raises(ConfigError, match="final-batch-size"):
        _cfg(final_batch_size=-1).validate()


def test_final_lora_rank_sets_the_final_stages_adapters_only(monkeypatch):
    """--final-lora-rank: the final stage's new adapters take that rank; the group stage keeps --lora-rank (same
    removals, same group losses); a negative value is refused."""
    import fusegpt.methods.fusegpt as fg
    import fusegpt.methods.heal as heal
    from fusegpt.fusion import FusedLinear

    ranks = []
    real_fg, real_heal = fg.train_group, heal.train_group

    def spy(real):
        def run(runner, blocks, *a, **kw):
            ranks.append({m.lora_A.shape[0] for b in blocks for m in b.modules() if isinstance(m, FusedLinear)})
            return real(runner, blocks, *a, **kw)
        return run

    monkeypatch.setattr(fg, "train_group", spy(real_fg))
    monkeypatch.setattr(heal, "train_group", spy(real_heal))
    base, low = _final_stage_pair(epochs=1, lr=None, final_lora_rank=2)
    assert ranks == [{4}, {4}, {4}, {4}, {4}, {2}]
    assert low.flops["train"] < base.flops["train"]  # the rank-r products of the final stage
    with pytest.raises(ConfigError, match="final-lora-rank"):
        _cfg(final_lora_rank=-1).validate()


def test_sampled_positions_take_the_loss_on_a_fraction_of_the_tokens():
    """The loss on a random fraction of the [B, T] positions: exactly that many, distinct, in position order,
    drawn anew per call from the generator (the same seed, the same draws); the gradient reaches the student only
    at those positions, and the fraction 1 is the plain loss."""
    from fusegpt.methods.heal import sampled_positions

    seen = []

    def fn(s, t):  # position p's rows hold p: record which positions the loss saw
        seen.append(t[:, 0].long().tolist())
        return ((s - t) ** 2).sum(-1).mean()

    t = torch.arange(16.0).reshape(2, 8, 1).expand(2, 8, 4).contiguous()
    s = (t + torch.randn(2, 8, 4)).requires_grad_(True)
    loss = sampled_positions(fn, 0.25, torch.Generator().manual_seed(0))
    first = loss(s, t)
    first.backward()
    pos = seen[0]
    assert len(pos) == 4 and pos == sorted(set(pos))
    picked = (s.grad.abs().sum(-1) > 0).flatten()
    assert picked.nonzero().flatten().tolist() == pos
    torch.testing.assert_close(first.detach(), ((s.detach() - t) ** 2).sum(-1).flatten()[pos].mean())
    for _ in range(3):
        loss(s, t)
    assert len({tuple(p) for p in seen}) > 1  # new draws per call
    seen.clear()
    sampled_positions(fn, 0.25, torch.Generator().manual_seed(0))(s, t)
    assert seen == [pos]  # the same seed, the same positions
    whole = sampled_positions(fn, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole(s, t), fn(s, t))


def test_final_positions_train_the_head_on_a_fraction():
    """--final-positions 0.5: the group stage is unchanged, the final stage still lowers its loss, its head FLOPs
    are half (3 passes on half the tokens), and the option is refused outside (0, 1] and with a hidden-state
    final loss (no next-token KL to sample)."""
    from fusegpt.adapters import get_adapter

    full, half = _final_stage_pair(final_positions=0.5)
    ff, fh = full.steps[-1].extra["final"], half.steps[-1].extra["final"]
    assert ff["steps"] == fh["steps"] == 4 and fh["nll_before"] == ff["nll_before"]
    assert fh["epoch_losses"][1] < fh["epoch_losses"][0] and fh["nll_after"] != ff["nll_after"]
    head = 2.0 * 3 * 2 * 8 * 16 * get_adapter(tiny_model("llama", 6)).head_macs_per_token()
    assert full.flops["train"] - half.flops["train"] == pytest.approx(head / 2, rel=1e-9)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="final-positions"):
            _cfg(final_positions=bad).validate()
    with pytest.raises(ConfigError, match="final-positions"):
        _cfg(final_positions=0.5, final_loss="nmse").validate()


def test_group_losses_share_one_forward(monkeypatch):
    """The report's loss and MSE of a group come from one forward per mini-batch, equal to separate calls."""
    from fusegpt.distill import group_loss

    model = tiny_model("llama", 3)
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 16, device=CPU, batch_size=4)
    blocks, kinds = list(ad.blocks)[:2], ad.block_kinds()[:2]
    x, y = torch.randn(8, 16, 64), torch.randn(8, 16, 64)
    alone = [group_loss(runner, blocks, kinds, x, y, name) for name in ("nmse", "mse")]
    calls = []
    real = runner.forward_blocks
    monkeypatch.setattr(runner, "forward_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = group_loss(runner, blocks, kinds, x, y, ["nmse", "mse"])
    assert both == pytest.approx(alone, rel=1e-6) and len(calls) == 2  # 8 windows in batches of 4


@pytest.mark.parametrize("train", ["coef+lora", "lora-alone"])
def test_counted_training_flops_match_the_executed_matmuls(train):
    """The FLOPs a training step counts (6 x the runner's forward MACs, fused weights' products included; for LoRA
    alone on a frozen base the forward's B A once and the rank-r backward) equal what torch's FLOP counter sees in
    the matmuls and attention the step runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusegpt.distill import ParamGroup, TrainSettings, train_group
    from fusegpt.fusion import FusedLinear, wrap_block

    torch.manual_seed(0)
    model = tiny_model("llama", 3)
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 16, device=CPU, batch_size=4)
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    if train == "coef+lora":
        inject_donor(ad, blocks[1], [blocks[0], blocks[2]], coef_kind="lowrank", coef_rank=4, lora_rank=4)
        student, skinds = [blocks[0], blocks[2]], [kinds[0], kinds[2]]
        fls = [m for b in student for m in b.modules() if isinstance(m, FusedLinear)]
        params = [p for m in fls for p in m.coefficient_parameters() + m.lora_parameters()]
    else:
        student, skinds = blocks, kinds
        fls = [m for b in blocks for m in wrap_block(ad, b, lora_rank=4).values()]
        params = [p for m in fls for p in m.lora_parameters()]
    x, y = torch.randn(4, 16, 64), torch.randn(4, 16, 64)
    m0, w0 = runner.macs, runner.weight_macs
    with FlopCounterMode(display=False) as fc:
        res = train_group(runner, student, skinds, x, y, [ParamGroup("p", params, 1e-3)],
                          TrainSettings(epochs=1, batch_size=4, loss="mse"))
    dm, dw = runner.macs - m0, runner.weight_macs - w0
    assert dw > 0 and res.steps == 1
    if train == "coef+lora":
        counted = 6 * dm
    else:
        from fusegpt.methods.heal import lora_training_flops

        counted = lora_training_flops(ad, student, dm, dw, res.tokens)
    assert counted == pytest.approx(fc.get_total_flops(), rel=0.02)
