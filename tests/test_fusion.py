import copy
import pytest
import torch
from torch import nn

from fusegpt.adapters import get_adapter
from fusegpt.activations import Runner
from fusegpt.fusion import COEF_KINDS, FusedLinear, fused_bias, fused_weight, inject_donor, merge_fused_linears

from conftest import random_ids, tiny_model


def test_formula():
    w, d = torch.randn(3, 4), torch.randn(3, 4)
    b, a = torch.randn(3, 2), torch.randn(2, 4)
    c = torch.randn(3, 1)
    torch.testing.assert_close(fused_weight(w, (b, a), [(c, d)]), w + b @ a + c * d)
    assert fused_bias(None, []) is None


@pytest.mark.parametrize("kind", COEF_KINDS)
def test_identity_at_start_and_merge_equals_forward(kind):
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(8, 6, bias=True)
    fl = FusedLinear(base, lora_rank=3, generator=g)
    fl.add_donor(torch.randn(6, 8), torch.randn(6), coef_kind=kind, coef_rank=2, generator=g)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fl(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        for p in fl.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    y = fl(x)
    assert not torch.allclose(y, base(x))
    lin = fl.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), y, rtol=1e-6, atol=1e-6)


def test_donor_buffers_and_grad_flow():
    fl = FusedLinear(nn.Linear(4, 4, bias=False), lora_rank=2)
    fl.add_donor(torch.randn(4, 4), None)
    names = dict(fl.named_buffers())
    assert "donor_weight_0" in names and not fl.weight.requires_grad
    fl(torch.randn(2, 4)).sum().backward()
    assert fl.coefs[0].coef_A.grad is not None and fl.lora_B.grad is not None


def test_injection_is_identity_on_group_output(family):
    """Group output right after injection equals plain removal of the donor."""
    model = tiny_model(family)
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 16, device=torch.device("cpu"), batch_size=4)
    h0 = runner.embed(random_ids(3, 16))
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    keep = [0, 1, 3, 4]
    plain = runner.run([blocks[i] for i in keep], [kinds[i] for i in keep], h0)
    inject_donor(ad, blocks[2], [blocks[i] for i in keep], coef_kind="lowrank", coef_rank=4, lora_rank=4)
    fused = runner.run([blocks[i] for i in keep], [kinds[i] for i in keep], h0)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_merge_replaces_every_fused_linear(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    inject_donor(ad, ad.blocks[0], [ad.blocks[1], ad.blocks[2]], coef_kind="vector", coef_rank=0, lora_rank=2)
    n = merge_fused_linears(model)
    assert n == 2 * len(ad.linear_names)
    assert not any(isinstance(m, FusedLinear) for m in model.modules())


def _reference_forward(fl: FusedLinear, x: torch.Tensor) -> torch.Tensor:
    """Plain autograd through the one formula (what fused_linear's hand-written backward must equal)."""
    return torch.nn.functional.linear(x, fl.effective_weight(), fl.effective_bias())


def _perturbed(kind: str, *, bias: bool, lora: int, donors: int, dtype=torch.float64) -> FusedLinear:
    g = torch.Generator().manual_seed(1)
    fl = FusedLinear(nn.Linear(7, 5, bias=bias).to(dtype), lora_rank=lora, generator=g)
    for _ in range(donors):
        fl.add_donor(torch.randn(5, 7, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype),
                     coef_kind=kind, coef_rank=3, generator=g)
    with torch.no_grad():
        for p in fl.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    return fl


@pytest.mark.parametrize("kind", COEF_KINDS)
@pytest.mark.parametrize("bias,lora,donors", [(True, 2, 2), (False, 0, 1)])
@pytest.mark.parametrize("save_weight", [True, False])
def test_fused_linear_backward_equals_autograd(kind, bias, lora, donors, save_weight):
    """Every factor's gradient (weight too: the `full` train mode) from the hand-written backward equals autograd
    through the formula, in float64; and torch's numerical gradcheck agrees."""
    fl = _perturbed(kind, bias=bias, lora=lora, donors=donors)
    fl.checkpoint = not save_weight
    for p in fl.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 5, dtype=torch.float64)
    params = [x, *fl.parameters()]
    got = torch.autograd.grad((fl(x) * upstream).sum(), params)
    want = torch.autograd.grad((_reference_forward(fl, x) * upstream).sum(), params)
    assert len(got) == len(want) >= 3
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fl(x), _reference_forward(fl, x), rtol=1e-12, atol=1e-12)

    lora_t = (fl.lora_B, fl.lora_A) if fl.lora_A is not None else None
    from fusegpt.fusion.math import fused_linear

    def f(x, *ps):
        return fused_linear(x, fl.weight, fl.bias, lora_t,
                            [(c.kind, tuple(c.parameters())[:2] if c.kind == "lowrank" else (c.coef,), c.coef_bias,
                              d, db) for c, d, db in fl.donors()], save_weight=save_weight)
    assert torch.autograd.gradcheck(f, (x, *fl.parameters()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("save_weight", [True, False])
def test_fused_linear_lora_only_on_a_frozen_linear_equals_autograd(bias, save_weight):
    """LoRA without donors on a frozen base (the final stage): the rank-r backward gives autograd's gradients for
    the input and both LoRA factors (float64), gradcheck agrees, and the base gets none."""
    from fusegpt.fusion.math import fused_linear

    fl = _perturbed("lowrank", bias=bias, lora=3, donors=0)
    fl.checkpoint = not save_weight
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 5, dtype=torch.float64)
    params = [x, fl.lora_A, fl.lora_B]
    got = torch.autograd.grad((fl(x) * upstream).sum(), params)
    want = torch.autograd.grad((_reference_forward(fl, x) * upstream).sum(), params)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-10, atol=1e-10)
    assert fl.weight.grad is None and not fl.weight.requires_grad

    def f(x, lb, la):
        return fused_linear(x, fl.weight, fl.bias, (lb, la), [], save_weight=save_weight)
    assert torch.autograd.gradcheck(f, (x, fl.lora_B, fl.lora_A))


@pytest.mark.parametrize("donors", [1, 0])
def test_fused_linear_frozen_parts_get_no_gradient_and_autocast_matches(donors):
    """Frozen base weight: no gradient is formed for it; under bf16 autocast the output and gradients follow what
    autograd through F.linear gives (same dtype, bf16 tolerance: W_eff is formed in bf16, not rounded once from
    fp32), with donors and with LoRA alone."""
    fl = _perturbed("lowrank", bias=True, lora=2, donors=donors, dtype=torch.float32)
    fl.weight.requires_grad_(False)
    fl.bias.requires_grad_(False)
    x = torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fl(x)
        ref = _reference_forward(fl, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    trained = [p for p in fl.parameters() if p.requires_grad]
    got = torch.autograd.grad(y.float().sum(), trained)
    want = torch.autograd.grad(ref.float().sum(), trained)
    for gg, ww in zip(got, want):
        assert gg.dtype == ww.dtype == torch.float32
        torch.testing.assert_close(gg, ww, rtol=2e-2, atol=2e-2)
    assert fl.weight.grad is None


@pytest.mark.parametrize("kind", COEF_KINDS)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_half_precision_path_follows_the_exact_formula(kind, weights):
    """Under bf16 autocast W_eff and the factors' products are formed in bf16 (fusion.math._effective): output and
    every trained factor's gradient stay within bf16 rounding of float64 autograd through the formula (relative
    error of each tensor, Frobenius norm), for fp32 masters and for bf16 weights; frozen bf16 weights are not
    written to."""
    g = torch.Generator().manual_seed(3)
    fl = FusedLinear(nn.Linear(48, 40, bias=True), lora_rank=8, generator=g)
    fl.add_donor(torch.randn(40, 48, generator=g) * 0.05, torch.randn(40, generator=g) * 0.05, coef_kind=kind,
                 coef_rank=6, generator=g)
    with torch.no_grad():
        for p in fl.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    exact = copy.deepcopy(fl).double()
    fl.weight.data = fl.weight.data.to(weights)
    exact.weight.data = fl.weight.data.double()  # the same (rounded) base weight on both sides
    fl.weight.requires_grad_(False)
    exact.weight.requires_grad_(False)
    before = fl.weight.detach().clone()
    x = torch.randn(3, 16, 48, generator=g)
    up = torch.randn(3, 16, 40, generator=g)
    trained = [p for p in fl.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fl(x)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad((y.float() * up).sum(), trained)
    ye = _reference_forward(exact, x.double())
    want = torch.autograd.grad((ye * up.double()).sum(), [p for p in exact.parameters() if p.requires_grad])

    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))

    assert rel(y, ye) < 1e-2
    assert len(got) == len(want) >= 4  # LoRA A, B, the coefficient and its bias term
    for gg, ww in zip(got, want):
        assert gg.dtype == torch.float32  # fp32 masters
        assert rel(gg, ww) < 2e-2
    assert torch.equal(fl.weight, before)
