"""Injecting a removed (donor) block into receiving blocks, and merging back to plain linears."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .linear import FusedLinear
from .math import fold_gain

__all__ = ["wrap_block", "inject_donor", "merge_fused_linears", "fused_linears", "block_spec", "rebuild_block"]


def _effective(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(linear, FusedLinear):
        with torch.no_grad():
            b = linear.effective_bias()
            return linear.effective_weight().detach(), None if b is None else b.detach()
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


def wrap_block(
    adapter, block: nn.Module, *, lora_rank: int, generator: torch.Generator | None = None
) -> dict[str, FusedLinear]:
    """Replace every fusable linear of ``block`` by a FusedLinear (already-fused ones are kept)."""
    out = {}
    for name, lin in adapter.block_linears(block).items():
        if not isinstance(lin, FusedLinear):
            lin = FusedLinear(lin, lora_rank=lora_rank, generator=generator)
            adapter.set_submodule(block, name, lin)
        out[name] = lin
    return out


@torch.no_grad()
def inject_donor(
    adapter, donor: nn.Module, receivers: Sequence[nn.Module], *, coef_kind: str, coef_rank: int, lora_rank: int,
    generator: torch.Generator | None = None, fold_norms: bool = False,
) -> None:
    """Give every receiver block the donor's effective weights, each with a new zero coefficient.

    ``fold_norms``: a donor linear fed by an input norm gets ``W diag(g_donor / g_receiver)`` (:func:`fold_gain`),
    so its term sees the donor's own norm scaling. After this call the receivers compute exactly what they computed
    before (all new terms are zero).
    """
    donor_linears = {name: _effective(lin) for name, lin in adapter.block_linears(donor).items()}
    for block in receivers:
        for name, fl in wrap_block(adapter, block, lora_rank=lora_rank, generator=generator).items():
            w, b = donor_linears[name]
            g_d = adapter.input_gain(donor, name) if fold_norms else None
            if g_d is not None:
                w = fold_gain(w, g_d.to(w.device), adapter.input_gain(block, name).to(w.device))
            fl.add_donor(w, b, coef_kind=coef_kind, coef_rank=coef_rank, generator=generator)


def fused_linears(module: nn.Module) -> list[tuple[str, FusedLinear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, FusedLinear)]


@torch.no_grad()
def merge_fused_linears(module: nn.Module) -> int:
    """Replace every FusedLinear below ``module`` by a plain nn.Linear with its effective weight (finite-checked).

    Returns how many were merged.
    """
    found = fused_linears(module)
    for name, fl in found:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, fl.to_linear())
    return len(found)


def block_spec(adapter, block: nn.Module) -> dict[str, Any]:
    """{linear name: None (plain) or its FusedLinear spec}."""
    return {name: (lin.spec() if isinstance(lin, FusedLinear) else None)
            for name, lin in adapter.block_linears(block).items()}


def rebuild_block(adapter, block: nn.Module, spec: dict[str, Any]) -> None:
    """Give ``block`` the structure of ``spec`` (plain linears become FusedLinear with the recorded donors and
    ranks; fused ones become plain), ready for ``load_state_dict``."""
    for name, lin in adapter.block_linears(block).items():
        want = spec.get(name)
        if want is None and not isinstance(lin, FusedLinear):
            continue
        w = lin.weight
        # a placeholder of the right shape (values come from the state dict; works on the meta device too)
        base = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        adapter.set_submodule(block, name, base if want is None else FusedLinear.from_spec(base, want))
