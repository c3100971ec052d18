"""Compress-evaluate-export as one run that writes a folder: checkpoint, report, plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .api import CompressReport, compress, preflight
from .config import CompressConfig
from .evaluate import evaluate_perplexity
from .export import check_output_dir, export_model
from .plots import plot_losses, plot_scores
from .report import write_json

log = logging.getLogger(__name__)

__all__ = ["run_compression", "write_report", "score_rows"]


def score_rows(steps) -> list[tuple[int, dict[int, float], list[tuple[int, int]]]]:
    """Rows of the score heat map: (step, scores, [(removal order, original block), ...]); each removal belongs to
    the last scoring at or before it (one row with k removals for one-shot, k rows with one each for iterative)."""
    rows: list[tuple[int, dict[int, float], list[tuple[int, int]]]] = []
    for order, s in enumerate(steps, 1):
        if s.scores:
            rows.append((s.step, s.scores, []))
        if rows:
            rows[-1][2].append((order, s.removed))
    return rows


def write_report(report: CompressReport, out: Path) -> None:
    write_json(out / "fusegpt_report.json", report)
    scored = score_rows(report.steps)
    if scored:
        plot_scores(scored, report.original_layers, out / "mi.png",
                    title="Macro Influence" if report.method == "fusegpt" else f"{report.method} score")
    if any(s.epoch_losses for s in report.steps):
        plot_losses([(s.removed, s.epoch_losses, s.loss_before, s.loss_after) for s in report.steps],
                    out / "loss.png", report.config.get("loss", "loss"))


def run_compression(
    model_name: str,
    config: CompressConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    evaluate: bool = True,
    eval_kwargs: dict[str, Any] | None = None,
    command: str | None = None,
) -> CompressReport:
    """Load, compress, (evaluate the in-memory result), export to ``out`` with the report and plots."""
    from .models import load_model

    out = check_output_dir(out, overwrite)
    preflight(model_name, config)  # every refusal happens here, before loading
    loaded = load_model(model_name)
    report = compress(loaded.model, config, tokenizer=loaded.tokenizer, source_model=model_name)
    if evaluate:
        res = evaluate_perplexity(loaded.model, loaded.tokenizer, desc="perplexity (compressed, in memory)",
                                  **(eval_kwargs or {}))
        report.evaluation["wikitext2"] = res.to_dict()
        log.info("WikiText-2 PPL of the compressed model: %.3f", res.ppl)
    t = time.perf_counter()
    meta = {"method": config.method, "source_model": model_name, "removed": report.removed, "kept": report.kept,
            "original_num_hidden_layers": report.original_layers, "config": config.to_dict(), "command": command}
    export_model(loaded.model, loaded.tokenizer, out, metadata=meta, overwrite=overwrite)
    report.evaluation["export_seconds"] = time.perf_counter() - t
    write_report(report, Path(out))
    return report
