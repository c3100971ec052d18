"""--dtype: weights loaded in bf16/fp16 (half the memory) while what trains keeps fp32 masters."""

import pytest
import torch
from torch import nn

from fusegpt.api import compress
from fusegpt.config import CompressConfig, ConfigError
from fusegpt.fusion import FusedLinear
from fusegpt.fusion.math import fused_linear, fused_weight

from conftest import random_ids, tiny_model


def _cfg(**kw):
    base = dict(remove=2, group_size=3, epochs=2, nsamples=8, score_samples=4, seqlen=16, coef_rank=4,
                lora_rank=4, batch_size=4, compute_dtype="auto")
    base.update(kw)
    return CompressConfig(**base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_get_fp32_trained_factors_and_exact_gradients(dtype):
    torch.manual_seed(0)
    fl = FusedLinear(nn.Linear(6, 5, bias=True).to(dtype), lora_rank=2)
    fl.add_donor(torch.randn(5, 6).to(dtype), torch.randn(5).to(dtype), coef_kind="lowrank", coef_rank=2)
    assert fl.weight.dtype == dtype and fl.lora_A.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fl.coefficient_parameters())
    with torch.no_grad():
        fl.lora_B.normal_()
        fl.coefs[0].coef_B.normal_()
    trained = [fl.lora_A, fl.lora_B, fl.coefs[0].coef_B, fl.coefs[0].coef_A, fl.coefs[0].coef_bias]
    for p in trained:
        p.requires_grad_(True)
    x = torch.randn(3, 6)
    y = fl(x)
    (y ** 2).sum().backward()
    got = [p.grad.clone() for p in trained]
    for p in trained:
        p.grad = None
    # reference: plain autograd through the same formula with every tensor promoted to fp32
    d, db = fl.donor_weight_0.float(), fl.donor_bias_0.float()
    c = fl.coefs[0]
    w = fused_weight(fl.weight.float(), (fl.lora_B, fl.lora_A), [(c.coef_B @ c.coef_A, d)])
    ref = x @ w.T + fl.bias.float() + c.coef_bias * db
    (ref ** 2).sum().backward()
    for g, p in zip(got, trained):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4)
    merged = fl.to_linear()
    assert merged.weight.dtype == dtype and merged.bias.dtype == dtype


def test_compress_a_bf16_model_keeps_bf16_weights_and_trains_in_fp32(monkeypatch):
    seen = []
    real = torch.optim.Adam

    def spy(groups, *a, **k):
        seen.append({p.dtype for g in groups for p in g["params"]})
        return real(groups, *a, **k)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    ids = random_ids(8, 16)
    model = tiny_model("llama", 6).to(torch.bfloat16)
    norm0 = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    rep = compress(model, _cfg(dtype="bf16", lr=1e-2), calib_ids=ids)
    assert rep.compute_dtype == "torch.bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # stored back in bf16 after training
    assert seen and all(dts == {torch.float32} for dts in seen)  # the optimizer only ever sees fp32 masters
    assert all(s.loss_after < s.loss_before for s in rep.steps)
    changed = [n for n, p in model.named_parameters() if n in norm0 and not torch.equal(p, norm0[n])]
    # the receivers' norms trained (in fp32) and were stored back (updates below bf16's resolution would round away)
    assert changed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp32_compute_with_half_weights_is_refused():
    with pytest.raises(ConfigError, match="fp32 weights"):
        _cfg(dtype="bf16", compute_dtype="fp32").validate()
    _cfg(dtype="bf16", compute_dtype="bf16").validate()


def test_fused_linear_mixed_dtypes_forward_matches_fp32():
    torch.manual_seed(1)
    w, d = torch.randn(4, 3).to(torch.bfloat16), torch.randn(4, 3).to(torch.bfloat16)
    cB, cA = torch.randn(4, 2), torch.randn(2, 3)
    x = torch.randn(2, 3)
    y = fused_linear(x, w, None, None, [("lowrank", (cB, cA), None, d, None)])
    ref = x @ (w.float() + (cB @ cA) * d.float()).T
    torch.testing.assert_close(y, ref)


def test_auto_weights_follow_the_compute_dtype():
    """--dtype auto: the weights in the compute dtype where it is half precision, else fp32; fp32 compute is
    allowed with it (it then means fp32 weights)."""
    from fusegpt.models import weight_dtype

    assert weight_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert weight_dtype("auto", torch.float16) == torch.float16
    assert weight_dtype("auto", None) == torch.float32
    assert weight_dtype("auto", torch.float32) == torch.float32
    assert weight_dtype("bf16", None) == torch.bfloat16  # an explicit dtype is kept
    _cfg(dtype="auto", compute_dtype="fp32").validate()
    _cfg(dtype="auto", compute_dtype="bf16").validate()


@pytest.mark.parametrize("compute,expect", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_cli_auto_weights_export_in_the_compute_dtype(tiny_folder, tmp_path, compute, expect):
    """The pipeline loads --dtype auto weights in the compute dtype, and the checkpoint it writes (which stock
    transformers loads) keeps them."""
    import json

    from safetensors import safe_open

    from fusegpt.cli import main

    out = tmp_path / "out"
    assert main(["compress", str(tiny_folder), "--out", str(out), "--remove", "1", "--nsamples", "8",
                 "--score-samples", "4", "--seqlen", "32", "--epochs", "1", "--coef-rank", "4", "--lora-rank", "4",
                 "--group-size", "3", "--batch-size", "4", "--dtype", "auto", "--compute-dtype", compute,
                 "--no-eval"]) == 0
    rep = json.loads((out / "fusegpt_report.json").read_text())
    assert rep["compute_dtype"] == ("torch.bfloat16" if compute == "bf16" else "torch.float32")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {{"bfloat16": "BF16", "float32": "F32"}[expect]}
