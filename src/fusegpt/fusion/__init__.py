"""Fusion: the FusedLinear wrapper, donor injection, merging."""

from .inject import fused_linears, inject_donor, merge_fused_linears, wrap_block
from .linear import COEF_KINDS, FusedLinear, FusionCoefficient, NonFiniteWeightError
from .math import fused_bias, fused_weight

__all__ = [
    "COEF_KINDS",
    "FusedLinear",
    "FusionCoefficient",
    "NonFiniteWeightError",
    "fused_bias",
    "fused_weight",
    "fused_linears",
    "inject_donor",
    "merge_fused_linears",
    "wrap_block",
]
