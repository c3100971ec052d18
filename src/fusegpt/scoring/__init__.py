"""Block importance: pure metrics and scorers through the activation runner."""

from .metrics import angular_distance, block_influence, macro_influence
from .mi import macro_influence_scores

__all__ = ["angular_distance", "block_influence", "macro_influence", "macro_influence_scores"]
