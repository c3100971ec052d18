"""Every baseline does what its paper says, checked by brute force on tiny models (full forwards, deep copies)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fusegpt.adapters import get_adapter
from fusegpt.api import compress
from fusegpt.config import CompressConfig
from fusegpt.export import export_model
from fusegpt.methods import method_info, method_names

from conftest import random_ids, tiny_model

L = 8
IDS = random_ids(4, 16, seed=3)


def _cfg(method, k, **kw):
    # fp32: every check below compares with fp32 brute force (the bf16 path has its own tests: test_bf16.py)
    base = dict(method=method, remove=k, sparsity=None, nsamples=4, score_samples=4, seqlen=16, epochs=1,
                batch_size=2, lora_rank=4, coef_rank=4, device="cpu", group_size=3, heal_from="drop-mi",
                compute_dtype="fp32")
    base.update(kw)
    return CompressConfig.from_dict(base)  # flat option keys (heal_from, laco_layers) go to their groups


def _run(method, k, model=None, **kw):
    model = model if model is not None else tiny_model("llama", num_layers=L)
    rep = compress(model, _cfg(method, k, **kw), calib_ids=IDS)
    return model, rep


def _layer_io(model, ids):
    """(inputs, outputs) of every decoder layer from hooks on a plain forward."""
    ins, outs, hooks = {}, {}, []

    def hook(i):
        def fn(module, args, kwargs, out):
            ins[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outs[i] = out[0] if isinstance(out, tuple) else out

        return fn

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [ins[i] for i in range(len(ins))], [outs[i] for i in range(len(outs))]


def _nll_without(model, ids, drop):
    m = copy.deepcopy(model)
    if drop:
        get_adapter(m).remove_blocks(drop)
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _argsort(xs):
    return sorted(range(len(xs)), key=xs.__getitem__)


def test_registry_lists_every_baseline():
    want = {"fusegpt", "fusegpt-global", "drop-mi", "shortgpt", "angular", "sleb", "taylor", "fisher", "ppl-oneshot",
            "magnitude", "random", "laco", "merge-average", "heal-lora"}
    assert want <= set(method_names())
    assert method_info("sleb").kind == "drop" and method_info("laco").kind == "merge"
    assert method_info("heal-lora").kind == "heal" and method_info("fusegpt-global").kind == "fuse"


def test_shortgpt_removes_lowest_block_influence():
    model = tiny_model("llama", num_layers=L)
    ins, outs = _layer_io(model, IDS)
    bi = [1 - F.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(ins, outs)]
    _, rep = _run("shortgpt", 3, model)
    assert rep.removed == _argsort(bi)[:3]
    assert rep.steps[0].scores == pytest.approx(dict(enumerate(bi)), rel=1e-4, abs=1e-6)
    assert all(s.scores is None for s in rep.steps[1:])  # one-shot


def test_sleb_rescores_after_every_removal():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    _, rep = _run("sleb", 2, model)
    first = [_nll_without(ref, IDS, [i]) for i in range(L)]
    assert rep.steps[0].scores == pytest.approx(dict(enumerate(first)), rel=1e-4)
    b0 = _argsort(first)[0]
    assert rep.removed[0] == b0
    # step 2 scores the model without b0 again (original indices)
    assert rep.steps[1].scores is not None and b0 not in rep.steps[1].scores
    kept = [i for i in range(L) if i != b0]
    second = {kept[j]: _nll_without(ref, IDS, sorted([b0, kept[j]])) for j in range(L - 1)}
    assert rep.steps[1].scores == pytest.approx(second, rel=1e-4)
    assert rep.removed[1] == min(second, key=second.get)


def test_ppl_oneshot_scores_once():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    _, rep = _run("ppl-oneshot", 3, model)
    nll = [_nll_without(ref, IDS, [i]) for i in range(L)]
    assert rep.removed == _argsort(nll)[:3]
    assert [s.scores is not None for s in rep.steps] == [True, False, False]


def test_angular_removes_the_best_contiguous_window():
    model = tiny_model("llama", num_layers=L)
    ins, outs = _layer_io(model, IDS)
    xs = ins + [outs[-1]]  # x_l = input of block l, x_L = output of the last block
    n = 3
    d = [torch.arccos(F.cosine_similarity(xs[l][:, -1], xs[l + n][:, -1], dim=-1).clamp(-1, 1)).mean().item() / math.pi
         for l in range(L - n + 1)]
    _, rep = _run("angular", n, model)
    start = _argsort(d)[0]
    assert sorted(rep.removed) == list(range(start, start + n))
    assert rep.steps[0].extra["window_start"] == start


def test_taylor_matches_autograd_on_the_full_model():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    logits = ref(input_ids=IDS, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)).backward()
    ad = get_adapter(ref)
    want = [sum((lin.weight * lin.weight.grad).abs().sum().item() for lin in ad.block_linears(b).values())
            for b in ad.blocks]
    _, rep = _run("taylor", 2, model)
    assert rep.steps[0].scores == pytest.approx(dict(enumerate(want)), rel=1e-3)
    assert rep.removed == _argsort(want)[:2]


def test_fisher_is_the_mean_squared_per_sequence_gradient():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    ad = get_adapter(ref)
    weights = [[lin.weight for lin in ad.block_linears(b).values()] for b in ad.blocks]
    want = [0.0] * L
    for n in range(IDS.shape[0]):  # brute force: one full forward + autograd.grad per sequence
        x = IDS[n : n + 1]
        logits = ref(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
        grads = torch.autograd.grad(loss, [w for ws in weights for w in ws])
        k = 0
        for b, ws in enumerate(weights):
            want[b] += sum(g.pow(2).sum().item() for g in grads[k : k + len(ws)]) / IDS.shape[0]
            k += len(ws)
    _, rep = _run("fisher", 2, model)
    assert rep.steps[0].scores == pytest.approx(dict(enumerate(want)), rel=1e-3)
    assert rep.removed == _argsort(want)[:2]


def test_magnitude_and_random():
    model = tiny_model("llama", num_layers=L)
    ad = get_adapter(model)
    mag = [sum(lin.weight.abs().sum().item() for lin in ad.block_linears(b).values()) for b in ad.blocks]
    _, rep = _run("magnitude", 2, model)
    assert rep.removed == _argsort(mag)[:2]
    _, r1 = _run("random", 3, seed=1)
    _, r2 = _run("random", 3, seed=1)
    _, r3 = _run("random", 3, seed=2)
    assert r1.removed == r2.removed and r1.removed != r3.removed


def test_drop_mi_removes_what_fusegpt_removes():
    _, a = _run("drop-mi", 3)
    _, b = _run("fusegpt", 3)
    assert a.removed == b.removed


def test_laco_base_becomes_base_plus_sum_of_differences():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    # threshold -1: the first trial (top window l = L - C) is accepted
    _, rep = _run("laco", 3, model, laco_layers=4, laco_threshold=-1.0)
    l = L - 4
    assert rep.removed == [l + 1, l + 2, l + 3]
    assert all(s.extra["merged_into"] == l for s in rep.steps)
    merged = dict(model.model.layers[l].named_parameters())
    layers = [dict(ref.model.layers[i].named_parameters()) for i in range(l, l + 4)]
    for name, p in merged.items():
        if "proj" in name:  # attention and MLP projections: base + sum of differences
            want = layers[0][name] + sum(layers[k][name] - layers[0][name] for k in (1, 2, 3))
            torch.testing.assert_close(p, want)
            # not the degenerate in-place result (= the last layer's weights)
            assert not torch.allclose(p, layers[3][name])
        else:  # norms keep the base layer's values
            torch.testing.assert_close(p, layers[0][name])
    assert model.config.num_hidden_layers == L - 3


def test_laco_rejects_below_threshold_and_reports_it():
    _, rep = _run("laco", 2, laco_layers=3, laco_threshold=0.999999)
    assert len(rep.removed) == 2
    assert rep.steps[0].extra["threshold"] < 0.999999  # lowered until a merge was accepted
    assert rep.steps[0].extra["similarity"] > rep.steps[0].extra["threshold"]


def test_merge_average_averages_into_the_neighbour():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    _, rep = _run("merge-average", 1, model)
    p = rep.removed[0]
    n = p - 1 if p > 0 else p + 1
    assert rep.steps[0].extra["merged_into"] == n
    new_idx = n if n < p else n - 1
    got = dict(model.model.layers[new_idx].named_parameters())
    a, b = dict(ref.model.layers[n].named_parameters()), dict(ref.model.layers[p].named_parameters())
    for name, t in got.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2)


def test_heal_lora_trains_after_removal_and_reports_time():
    model = tiny_model("llama", num_layers=L)
    plain, _ = _run("drop-mi", 2)
    _, rep = _run("heal-lora", 2, model, epochs=8, lr=3e-3, lora_rank=8)
    assert rep.removed == _run("drop-mi", 2)[1].removed
    last = rep.steps[-1]
    assert last.seconds["heal"] > 0 and last.extra["heal"]["from"] == "drop-mi"
    assert last.loss_after < last.loss_before  # calibration NLL went down
    w = model.model.layers[0].self_attn.q_proj
    assert isinstance(w, torch.nn.Linear) and not torch.equal(w.weight, plain.model.layers[0].self_attn.q_proj.weight)


def test_fusegpt_global_fuses_into_most_similar_blocks():
    model = tiny_model("llama", num_layers=L)
    ref = copy.deepcopy(model)
    _, rep = _run("fusegpt-global", 1, model, global_receivers=2, epochs=0)
    p = rep.removed[0]
    _, outs = _layer_io(ref, IDS)
    sims = {j: F.cosine_similarity(outs[p], outs[j], dim=-1).mean().item() for j in range(L) if j != p}
    assert rep.steps[0].group == sorted(sorted(sims, key=sims.get, reverse=True)[:2])
    # no training: the fused model equals plain removal (all new terms are zero)
    plain = copy.deepcopy(ref)
    get_adapter(plain).remove_blocks([p])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["laco", "merge-average", "heal-lora", "fusegpt-global", "sleb"])
def test_methods_export_and_reload(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model, rep = _run(method, 2)
    out = export_model(model, None, tmp_path / method, metadata={"removed": rep.removed})
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == L - 2
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
