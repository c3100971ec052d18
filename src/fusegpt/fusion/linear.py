"""``FusedLinear``: a linear layer that has absorbed the weights of removed blocks (like peft's LoRA layer).

It wraps the receiving ``nn.Linear``; donor weights are buffers; the effective weight is computed in exactly one
place (:meth:`FusedLinear.effective_weight`), used by forward, merge, export and tests. At initialisation every new
term is zero (LoRA B = 0, coefficient = 0 or C_B = 0), so the layer equals its base linear.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .math import coef_value, fused_bias, fused_linear, fused_weight, master_dtype

__all__ = ["COEF_KINDS", "FusionCoefficient", "FusedLinear", "NonFiniteWeightError"]

COEF_KINDS = ("scalar", "vector", "matrix", "lowrank")


class NonFiniteWeightError(FloatingPointError):
    """A merged weight holds NaN or Inf."""


def _kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    """Kaiming-uniform init; drawn on the generator's device and copied, so one seeded CPU generator gives the
    same initial values whatever device the tensor lives on."""
    if generator is not None and generator.device != t.device:
        tmp = torch.empty(t.shape, dtype=torch.float32, device=generator.device)
        nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            t.copy_(tmp)
        return
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class FusionCoefficient(nn.Module):
    """The learnable coefficient C of one donor, zero at start.

    kinds: ``scalar`` (one number), ``vector`` (one per output row, the reference's non-matrix mode),
    ``matrix`` (full [out, in]), ``lowrank`` (C_B [out, r] @ C_A [r, in], C_B zero, C_A Kaiming-uniform).
    """

    def __init__(
        self, kind: str, out_features: int, in_features: int, rank: int = 128, *,
        has_bias: bool = False, generator: torch.Generator | None = None,
        device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if kind not in COEF_KINDS:
            raise ValueError(f"unknown coefficient kind {kind!r}; use one of {COEF_KINDS}")
        self.kind = kind
        kw = {"device": device, "dtype": dtype}
        if kind == "scalar":
            self.coef = nn.Parameter(torch.zeros(1, 1, **kw))
        elif kind == "vector":
            self.coef = nn.Parameter(torch.zeros(out_features, 1, **kw))
        elif kind == "matrix":
            self.coef = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        else:
            r = max(1, min(rank, out_features, in_features))
            self.coef_B = nn.Parameter(torch.zeros(out_features, r, **kw))
            self.coef_A = nn.Parameter(torch.empty(r, in_features, **kw))
            _kaiming_(self.coef_A.data, generator)
        self.coef_bias = nn.Parameter(torch.zeros(out_features, **kw)) if has_bias else None

    def value(self) -> torch.Tensor:
        """C, broadcastable to [out, in]."""
        return coef_value(self.kind, (self.coef_B, self.coef_A) if self.kind == "lowrank" else (self.coef,))


class FusedLinear(nn.Module):
    """y = x W_eff^T + b_eff with W_eff = W + B A + sum_k C_k ⊙ D_k (see :mod:`fusegpt.fusion.math`)."""

    def __init__(self, base: nn.Linear, *, lora_rank: int = 128, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        # the base linear's own tensors (it is replaced by this layer; a copy would hold a second receiving block
        # in memory while the group is wrapped)
        w = base.weight
        self.weight = nn.Parameter(w.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        # what trains (LoRA, coefficients) is created in fp32 when the weights are half precision (fp32 masters)
        self.master_dtype = master_dtype(w.dtype)
        if lora_rank > 0:
            r = min(lora_rank, self.in_features, self.out_features)
            md = self.master_dtype
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=md))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=md))
            _kaiming_(self.lora_A.data, generator)
        else:
            self.lora_A = self.lora_B = None
        self.coefs = nn.ModuleList()
        self.num_donors = 0
        # form the effective weight again in backward instead of keeping it (with gradient checkpointing)
        self.checkpoint = False

    # ---- donors -------------------------------------------------------------------------------------------
    def add_donor(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, coef_kind: str = "lowrank", coef_rank: int = 128,
        generator: torch.Generator | None = None,
    ) -> None:
        """Register a removed block's (effective) weight as a buffer with a new zero coefficient.

        The buffer is the given tensor itself when dtype and device match (never modified in place: every receiver
        of one donor shares one copy, so fusing into G blocks costs one donor block of memory, not G)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            want = (self.out_features, self.in_features)
            raise ValueError(f"donor weight {tuple(weight.shape)} does not match {want}")
        k = self.num_donors
        self.register_buffer(f"donor_weight_{k}", weight.detach().to(self.weight))
        use_bias = bias is not None and self.bias is not None
        self.register_buffer(f"donor_bias_{k}", bias.detach().to(self.weight) if use_bias else None)
        self.coefs.append(FusionCoefficient(
            coef_kind, self.out_features, self.in_features, coef_rank, has_bias=use_bias, generator=generator,
            device=self.weight.device, dtype=self.master_dtype,
        ))
        self.num_donors += 1

    def donors(self) -> Iterator[tuple[FusionCoefficient, torch.Tensor, torch.Tensor | None]]:
        for k, coef in enumerate(self.coefs):
            yield coef, getattr(self, f"donor_weight_{k}"), getattr(self, f"donor_bias_{k}")

    # ---- the one formula ----------------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        lora = (self.lora_B, self.lora_A) if self.lora_A is not None else None
        return fused_weight(self.weight, lora, [(c.value(), d) for c, d, _ in self.donors()])

    def effective_bias(self) -> torch.Tensor | None:
        return fused_bias(self.bias, [(c.coef_bias, d) for c, _, d in self.donors() if d is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W_eff is formed in the parameters' dtype (fp32 master weights) for this call only (never kept between
        # calls: for a group of G receivers that would be G blocks of memory), through fusion.math.fused_linear,
        # whose backward forms one weight-sized gradient; with checkpointing W_eff is not kept for backward
        # either but formed again there, one layer at a time. The product follows any autocast, like F.linear.
        lora = (self.lora_B, self.lora_A) if self.lora_A is not None else None
        donors = [(c.kind, (c.coef_B, c.coef_A) if c.kind == "lowrank" else (c.coef,), c.coef_bias, d, db)
                  for c, d, db in self.donors()]
        return fused_linear(x, self.weight, self.bias, lora, donors, save_weight=not self.checkpoint)

    def weight_macs(self) -> int:
        """Multiply-accumulates one forward spends forming W_eff besides the tokens' x W_eff^T: out x in x rank for
        B A and for each low-rank coefficient C_B C_A (0 when neither is there)."""
        ranks = (self.lora_A.shape[0] if self.lora_A is not None else 0) + sum(
            c.coef_A.shape[0] for c in self.coefs if c.kind == "lowrank")
        return self.out_features * self.in_features * ranks

    def lora_token_macs(self) -> int:
        """Multiply-accumulates per token of the rank-r products LoRA's backward runs when it trains alone on a
        frozen base (fusion.math: dB = g^T (x A^T), dA = (g B)^T x): 2 x r x (in + out)."""
        r = self.lora_A.shape[0] if self.lora_A is not None else 0
        return 2 * r * (self.in_features + self.out_features)

    # ---- parameter groups ---------------------------------------------------------------------------------
    def coefficient_parameters(self) -> list[nn.Parameter]:
        return list(self.coefs.parameters())

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_A, self.lora_B) if p is not None]

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the effective weight (in the base weight's dtype); raises NonFiniteWeightError
        on NaN/Inf."""
        w = self.effective_weight().detach().to(self.weight.dtype)
        b = self.effective_bias()
        b = None if b is None else b.to(self.weight.dtype)
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise NonFiniteWeightError("merged fused weight is not finite; refusing to export NaN/Inf")
        lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w)  # W_eff itself: no second copy
        if b is not None:
            lin.bias = nn.Parameter(b.detach())
        return lin

    # ---- structure (for checkpoints: rebuild the same module, then load its state dict) ---------------------
    def spec(self) -> dict:
        """The structure of this layer without its values: LoRA rank and, per donor, coefficient kind, rank and
        whether it has a bias term."""
        return {"lora_rank": 0 if self.lora_A is None else int(self.lora_A.shape[0]),
                "donors": [{"kind": c.kind, "rank": int(c.coef_A.shape[0]) if c.kind == "lowrank" else 0,
                            "bias": d is not None} for c, _, d in self.donors()]}

    @classmethod
    def from_spec(cls, base: nn.Linear, spec: dict) -> "FusedLinear":
        """A layer with the structure of ``spec`` around ``base``; its values are placeholders until a state dict
        saved from the original layer is loaded."""
        fl = cls(base, lora_rank=int(spec["lora_rank"]))
        for d in spec["donors"]:
            w = torch.zeros_like(fl.weight)
            b = torch.zeros_like(fl.bias) if d["bias"] and fl.bias is not None else None
            fl.add_donor(w, b, coef_kind=d["kind"], coef_rank=max(1, int(d["rank"])))
        return fl

    def extra_repr(self) -> str:
        r = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, lora_rank={r}, donors={self.num_donors}"
