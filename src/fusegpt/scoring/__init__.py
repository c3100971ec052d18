"""Block importance: pure metrics and scorers through the activation runner."""

from .metrics import angular_distance, block_influence, macro_influence, magnitude, next_token_nll, taylor_importance
from .mi import macro_influence_scores
from .scorers import (
    angular_window_distances, block_influence_scores, lm_nll, magnitude_scores, output_similarity, skip_nll_scores,
    taylor_scores,
)

__all__ = [
    "angular_distance", "angular_window_distances", "block_influence", "block_influence_scores", "lm_nll",
    "macro_influence", "macro_influence_scores", "magnitude", "magnitude_scores", "next_token_nll",
    "output_similarity", "skip_nll_scores", "taylor_importance", "taylor_scores",
]
