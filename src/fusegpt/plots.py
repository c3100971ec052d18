"""Plots of a compression report (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

__all__ = ["plot_scores", "plot_losses", "plot_bench", "plot_pareto", "plot_compare", "plot_search"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_scores(rows: Sequence[tuple[int, dict[int, float], Sequence[tuple[int, int]]]], num_blocks: int,
                path: str | os.PathLike, title: str = "Macro Influence per block") -> Path:
    """Heat map: one row per scored iteration (step, {original block: score}, [(order, block), ...]): every block
    removed on the strength of that row's scores is outlined in red and labelled with its removal order (1 = first),
    so a one-shot run (one scored row, k removals) shows all k."""
    plt = _plt()
    import numpy as np

    data = np.full((len(rows), num_blocks), np.nan)
    for r, (_, scores, _) in enumerate(rows):
        for b, v in scores.items():
            data[r, b] = v
    fig, ax = plt.subplots(figsize=(max(6, num_blocks * 0.3), 1.2 + 0.45 * max(len(rows), 2)))
    shown = np.log10(np.clip(data, 1e-6, None))
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    for r, (_, _, removed) in enumerate(rows):
        for order, block in removed:
            ax.add_patch(plt.Rectangle((block - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
            ax.text(block, r, str(order), ha="center", va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_xlabel("original block index")
    ax.set_ylabel("iteration")
    ax.set_yticks(range(len(rows)), [str(s + 1) for s, _, _ in rows])
    ax.set_xticks(range(0, num_blocks, max(1, num_blocks // 15)))
    fig.colorbar(im, ax=ax, label="log10 score")
    ax.set_title(f"{title} (red, numbered: removed in that order; blank: already removed)")
    fig_path = _save(fig, path)
    plt.close(fig)
    return fig_path


def plot_losses(steps: Sequence[tuple[int, list[float], float | None, float | None]], path: str | os.PathLike,
                loss_name: str) -> Path:
    """Left: training loss per epoch for every step; right: group loss before/after per step (log scale)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for removed, losses, _, _ in steps:
        if losses:
            a.plot(range(1, len(losses) + 1), losses, marker="o", label=f"block {removed}")
    a.set_xlabel("epoch")
    a.set_ylabel(f"train loss ({loss_name})")
    a.set_yscale("log")
    if steps:
        a.legend(fontsize=7, ncol=2)
    xs = list(range(1, len(steps) + 1))
    before = [s[2] if s[2] is not None else math.nan for s in steps]
    after = [s[3] if s[3] is not None else math.nan for s in steps]
    b.plot(xs, before, marker="o", label="before (plain removal)")
    b.plot(xs, after, marker="o", label="after distillation")
    b.set_xlabel("step")
    b.set_ylabel(f"group loss ({loss_name})")
    b.set_yscale("log")
    b.legend()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_bench(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Bars: prefill latency (ms) and decode throughput (tokens/s) per model; rows are ModelBench dicts."""
    plt = _plt()
    names = [r["name"] for r in rows]
    batches = sorted(rows[0]["decode"], key=lambda k: int(k[1:]))
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(4 * (1 + len(batches)), 3.6))
    pre = [r["prefill"]["median_s"] * 1e3 for r in rows]
    err = [[(r["prefill"]["median_s"] - r["prefill"]["min_s"]) * 1e3 for r in rows],
           [(r["prefill"]["max_s"] - r["prefill"]["median_s"]) * 1e3 for r in rows]]
    axes[0].bar(names, pre, yerr=err, color="tab:blue")
    axes[0].set_title("prefill latency (ms), batch 1")
    for ax, b in zip(axes[1:], batches):
        axes_vals = [r["decode"][b]["tokens_per_second"] for r in rows]
        ax.bar(names, axes_vals, color="tab:green")
        ax.set_title(f"decode tokens/s, batch {b[1:]}")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_pareto(points: Sequence[tuple[str, float, float]], path: str | os.PathLike,
                ylabel: str = "WikiText-2 PPL") -> Path:
    """Quality vs measured speedup: (label, speedup, quality) per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("measured prefill speedup vs reference")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_compare(rows: Sequence[dict], path: str | os.PathLike, *, dense_ppl: float | None = None,
                 title: str = "", clip: float = 10.0) -> Path:
    """PPL vs sparsity, one line per method (log scale), the dense model as a dotted line.

    The y axis stops at ``clip`` x the dense PPL so that the useful methods stay readable; points above it are
    drawn as triangles on the top edge and the legend gives the method's lowest PPL.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({r["method"] for r in rows if r["method"] != "dense"},
                     key=lambda m: min(r["ppl"] for r in rows if r["method"] == m))
    top = clip * dense_ppl if dense_ppl else max(r["ppl"] for r in rows)
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == m)
        xs, ys = [p[0] for p in pts], [min(p[1], top) for p in pts]
        off = [p for p in pts if p[1] > top]
        label = m if not off else f"{m} (off scale; lowest {min(p[1] for p in pts):.3g})"
        main = m == "fusegpt"
        ax.plot(xs, ys, "-" if m.startswith("fusegpt") else "--", color=cmap(i % 20), lw=2.5 if main else 1.2,
                label=label, zorder=3 if main else 2)
        ax.scatter([p[0] for p in pts if p[1] <= top], [p[1] for p in pts if p[1] <= top], color=cmap(i % 20),
                   s=30 if main else 14, zorder=3)
        if off:
            ax.scatter([p[0] for p in off], [top] * len(off), marker="^", color=cmap(i % 20), s=30, zorder=3)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="k", ls=":", lw=1, label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.15)
    ax.set_xlabel("sparsity (fraction of blocks removed)")
    ax.set_ylabel("WikiText-2 PPL (log)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_search(generations: Sequence[dict], evaluations: Sequence[dict], seed_fitness: float,
                path: str | os.PathLike, *, title: str = "") -> Path:
    """Best fitness per generation (line), every candidate measured on all windows (dots), the MI-greedy seed as a
    dashed reference line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    full = max((e["windows"] for e in evaluations), default=0)
    for part, color, size in ((False, "tab:gray", 10), (True, "k", 14)):  # early stages, then all windows
        pts = [(e["generation"], e["fitness"]) for e in evaluations if (e["windows"] == full) == part]
        if pts:
            label = f"candidates, all {full} windows" if part else "candidates, first stages (fewer windows)"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=size, color=color, alpha=0.5, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot([g["generation"] for g in generations], [g["best_fitness"] for g in generations], "-o", color="tab:blue",
            lw=2, ms=4, label="best so far")
    ax.axhline(seed_fitness, color="tab:red", ls="--", lw=1, label=f"MI greedy ({seed_fitness:.4g})")
    ax.set_xlabel("generation")
    ax.set_ylabel("KL(dense || candidate), held-out windows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
