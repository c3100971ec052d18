"""Evaluation: perplexity (and, later, zero-shot tasks)."""

from .perplexity import PerplexityResult, evaluate_perplexity, perplexity_windows

__all__ = ["PerplexityResult", "evaluate_perplexity", "perplexity_windows"]
