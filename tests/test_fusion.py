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
