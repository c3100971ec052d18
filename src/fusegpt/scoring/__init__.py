"""Block importance: pure metrics and scorers through the activation runner."""

from .metrics import angular_distance, block_influence, macro_influence, magnitude, next_token_nll, taylor_importance
from .mi import macro_influence_scores
from .scorers import (
    angular_window_distances, block_influence_scores, fisher_scores, lm_nll, magnitude_scores, output_similarity,
    skip_nll_scores, taylor_scores,
)

# Block orders through the activation cache, lower = remove first: fn(cache, ids, desc) -> one score per current
# block. Macro Influence (the paper), ShortGPT's Block Influence, or the calibration NLL with the block skipped
# (SLEB when re-scored after every removal, Shortened-LLaMA's PPL criterion when scored once). Shared by fusegpt's
# selection (--order) and the drop baselines.
ORDERS = {
    "mi": lambda cache, ids, desc: macro_influence_scores(cache, desc=desc),
    "bi": lambda cache, ids, desc: block_influence_scores(cache),
    "nll": lambda cache, ids, desc: skip_nll_scores(cache, ids, desc=desc),
    # empirical Fisher (squared per-sequence gradients of every block's weights): needs every block's weights at
    # once, so not with --offload disk
    "fisher": lambda cache, ids, desc: fisher_scores(cache.runner, ids),
}

__all__ = [
    "ORDERS", "angular_distance", "angular_window_distances", "block_influence", "block_influence_scores",
    "fisher_scores", "lm_nll",
    "macro_influence", "macro_influence_scores", "magnitude", "magnitude_scores", "next_token_nll",
    "output_similarity", "skip_nll_scores", "taylor_importance", "taylor_scores",
]
