"""FuseGPT core on tiny models: MI cache == brute force, identity at start, iterative vs one-shot, faults."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fusegpt.activations import ActivationCache, Runner
from fusegpt.adapters import get_adapter
from fusegpt.api import compress
from fusegpt.config import CompressConfig, ConfigError, num_removals
from fusegpt.distill import get_loss, group_window, train_group, ParamGroup, TrainSettings
from fusegpt.scoring import macro_influence_scores

from conftest import random_ids, tiny_model

CPU = torch.device("cpu")


def _final_hidden_without(model, ids, skip):
    """Brute force: a deep copy with block `skip` removed; the input of the final norm, captured by a hook."""
    m = copy.deepcopy(model)
    if skip is not None:
        get_adapter(m).remove_blocks([skip])
    got = {}
    h = m.model.norm.register_forward_hook(lambda mod, inp, out: got.setdefault("h", inp[0]))
    with torch.no_grad():
        m.model(input_ids=ids, use_cache=False)
    h.remove()
    return got["h"]


def test_cached_mi_equals_brute_force(family):
    model = tiny_model(family)
    ids = random_ids(3, 16)
    runner = Runner.for_model(get_adapter(model), 16, device=CPU, batch_size=2)
    cache = ActivationCache(runner, ids)
    scores = macro_influence_scores(cache, desc=None)
    full = _final_hidden_without(model, ids, None)
    brute = [1 - F.cosine_similarity(full, _final_hidden_without(model, ids, i), dim=-1).mean().item()
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


def test_nonfinite_loss_restores_group(monkeypatch):
    import fusegpt.distill.losses as losses

    monkeypatch.setitem(losses.LOSSES, "mse", lambda s, t: (s - t).pow(2).mean() * float("nan"))
    model = tiny_model("llama", 6)
    rep = compress(model, _cfg(remove=1, consolidate=False), calib_ids=random_ids(8, 16))
    s = rep.steps[0]
    assert s.nonfinite and s.restored and s.train_steps == 0
    from fusegpt.fusion import fused_linears

    for _, fl in fused_linears(model):
        assert torch.isfinite(fl.effective_weight()).all()
        assert all(float(p.abs().sum()) == 0 for p in fl.lora_parameters()[1:])  # B still zero


def test_trainer_restores_parameters_on_nan_inputs():
    lin = torch.nn.Linear(4, 4)
    ad_blocks = [lin]

    class R:  # a minimal runner stand-in: forward_blocks applies the linear
        device = CPU
        batch_size = 2
        macs = 0.0

        def forward_blocks(self, blocks, kinds, x):
            return blocks[0](x)

    before = lin.weight.detach().clone()
    x = torch.randn(4, 3, 4)
    y = torch.full((4, 3, 4), float("nan"))
    res = train_group(R(), ad_blocks, ["full_attention"], x, y, [ParamGroup("w", [lin.weight], 1e-1)],
                      TrainSettings(loss="mse", epochs=2, batch_size=2))
    assert res.nonfinite and res.restored and torch.equal(lin.weight, before)


def test_config_validation():
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
