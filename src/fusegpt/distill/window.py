"""The partial group around a removed block (FuseGPT Sec. 3.3)."""

from __future__ import annotations

__all__ = ["group_window"]


def group_window(p: int, num_blocks: int, group_size: int) -> list[int]:
    """Receiving blocks for removed block ``p``: ``group_size`` (G) blocks around p, p excluded.

    The window is G + 1 consecutive blocks including p, with ceil(G/2) before p and floor(G/2) after it (the
    reference: G = 7 -> 4 before, 3 after), shifted to stay inside 0 .. num_blocks-1 when it would cross an end,
    and clipped to all other blocks when the model is shallower than the window.
    """
    if not 0 <= p < num_blocks:
        raise IndexError(f"block {p} out of range for {num_blocks} blocks")
    if group_size < 1:
        raise ValueError("group_size must be >= 1")
    width = min(group_size + 1, num_blocks)
    start = p - (group_size + 1) // 2
    start = max(0, min(start, num_blocks - width))
    return [i for i in range(start, start + width) if i != p]
