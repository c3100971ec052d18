"""Fusion: the FusedLinear wrapper, donor injection, merging."""

from .inject import fused_linears, inject_donor, merge_fused_linears, wrap_block
from .linear import COEF_KINDS, FusedLinear, FusionCoefficient, NonFiniteWeightError
from .math import average_merge, fused_bias, fused_weight, rdsc_merge

__all__ = [
    "COEF_KINDS",
    "FusedLinear",
    "FusionCoefficient",
    "NonFiniteWeightError",
    "average_merge",
    "fused_bias",
    "rdsc_merge",
    "fused_weight",
    "fused_linears",
    "inject_donor",
    "merge_fused_linears",
    "wrap_block",
]
