"""The written-out training attention (fusegpt.attention) against PyTorch's and transformers' own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_ids, tiny_model
from fusegpt.attention import attention, cpu_training_attention, training_attention


def _qkv(b=2, h=6, kv=2, t=12, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(b, kv, t, d, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(b, kv, t, d, generator=g, dtype=dtype).requires_grad_(True)
    return q, k, v


def _reference(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)


def _grads(fn, q, k, v, go):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("kind", ["causal", "sliding-bool", "additive", "padded-bool", "padded-additive"])
def test_exact_in_float64(kind):
    """Output and the q / k / v gradients equal SDPA's (grouped heads expanded) in float64, with masks shared by
    the batch or one per sequence (left padding in the second)."""
    q, k, v = _qkv()
    b, h, t, _ = q.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    padded = causal.expand(b, 1, t, t).clone()
    padded[1, :, :, :3] = False  # the second sequence's first 3 keys are padding
    padded[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # (padding queries see themselves: no empty row)
    mask = {"causal": None,
            "sliding-bool": (causal & ~torch.ones(t, t, dtype=torch.bool).tril(-4))[None, None],
            "additive": torch.where(causal, 0.0, float("-inf")).double()[None, None] + 0.1 * torch.randn(1, 1, t, t,
                                                                                          dtype=torch.float64),
            "padded-bool": padded,
            "padded-additive": torch.where(padded, 0.0, float("-inf")).double()}[kind]
    go = torch.randn(q.shape, dtype=torch.float64)
    ours = _grads(lambda a, b, c: attention(a, b, c, mask, 0.3), q, k, v, go)
    ref = _grads(lambda a, b, c: _reference(a, b, c, mask, 0.3), q, k, v, go)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_within_rounding_of_float64():
    """In bf16 (probabilities rounded once, fp32 softmax and accumulation) every result stays within bf16 rounding
    of the float64 computation, and the gradients come back in the inputs' dtypes."""
    q, k, v = _qkv(t=64, d=16)
    go = torch.randn(q.shape, dtype=torch.float64)
    ref = _grads(lambda a, b, c: _reference(a, b, c, None, None), q, k, v, go)
    qb, kb, vb = (x.detach().bfloat16().requires_grad_(True) for x in (q, k, v))
    ours = _grads(lambda a, b, c: attention(a, b, c), qb, kb, vb, go.bfloat16())
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        err = (a.double() - b).norm() / b.norm()
        assert err < 2e-2, float(err)


def test_dispatch_only_where_it_applies(monkeypatch):
    """training_attention runs the written-out path on a CPU with autograd recording in half precision, and
    transformers' SDPA function otherwise (fp32, no grad, dropout)."""
    import fusegpt.attention as A

    calls = []
    real = A._Attention.apply
    monkeypatch.setattr(A._Attention, "apply", lambda *a: calls.append(1) or real(*a))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    q, k, v = (x.detach().float().requires_grad_(True) for x in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = training_attention(module, q, k, v, None, scaling=0.3)
        assert out.shape == (2, 12, 6, 8) and calls == [1]
        with torch.no_grad():
            training_attention(module, q, k, v, None, scaling=0.3)
        training_attention(module, q, k, v, None, dropout=0.1, scaling=0.3)
    training_attention(module, q, k, v, None, scaling=0.3)  # fp32: the stock kernel
    assert calls == [1]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_blocks_train_the_same_under_the_swap(family, monkeypatch):
    """A tiny model with transformers' sdpa: under bf16 autocast the loss and every weight's gradient are those of
    the stock kernel (within bf16 rounding), including sliding-window layers; outside the context the stock
    function is back."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(family, num_layers=3, attn="sdpa")
    ids = random_ids(2, 24)
    stock = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def run():
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = run()
    import fusegpt.attention as A

    calls = []
    real = A._Attention.apply
    monkeypatch.setattr(A._Attention, "apply", lambda *a: calls.append(1) or real(*a))
    with cpu_training_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is training_attention
        loss, got = run()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is stock
    assert len(calls) == 3  # every block ran the written-out attention
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in ref.items():
        err = (got[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err < 5e-2, (name, float(err))
