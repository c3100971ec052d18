"""Compress-evaluate-export as one run that writes a folder: checkpoint, report, plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .api import CompressReport, compress, preflight, resolve_compute_dtype, resolve_weight_dtype
from .config import CompressConfig
from .evaluate import evaluate_perplexity
from .export import OutputExistsError, check_output_dir, check_writable, export_model
from .plots import plot_losses, plot_scores
from .report import versions, write_json

log = logging.getLogger(__name__)

__all__ = ["run_compression", "run_search", "write_report", "score_rows"]


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


RUN_DIR = ".fusegpt-run"


def _check_resume_dir(out: Path) -> None:
    """--resume needs the run folder of an unfinished run in ``out``."""
    run = out / RUN_DIR
    if not (run / "settings.json").is_file():
        if (out / "fusegpt_report.json").is_file():
            raise OutputExistsError(f"the run in {str(out)!r} has finished already (fusegpt_report.json is there); "
                                    "nothing to resume")
        raise OutputExistsError(f"--resume: {str(out)!r} holds no unfinished run ({RUN_DIR}/settings.json); "
                                "run without --resume to start one")
    others = [p.name for p in out.iterdir() if p.name != RUN_DIR]
    if others:
        raise OutputExistsError(f"--resume: {str(out)!r} holds other files than the run folder ({', '.join(others)});"
                                " choose the folder of the interrupted run")
    check_writable(out)


def run_compression(
    model_name: str,
    config: CompressConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    evaluate: bool = True,
    eval_kwargs: dict[str, Any] | None = None,
    command: str | None = None,
) -> CompressReport:
    """Load, compress, (evaluate the in-memory result), export to ``out`` with the report and plots.

    The run is persisted in ``out/.fusegpt-run`` after every finished step; ``resume`` continues it there. The
    export replaces that folder with the checkpoint, report and plots in one atomic rename.
    """
    from .distributed import barrier, is_main, world_size
    from .methods.base import method_info
    from .models import load_model, source_fingerprint
    from .plan import fit_offload, format_plan, plan_run

    out = Path(out)
    if resume:
        _check_resume_dir(out)
    elif is_main():  # under torch.distributed rank 0 alone writes --out
        check_output_dir(out, overwrite)
    info = preflight(model_name, config)  # every refusal happens here, before loading
    compute = resolve_compute_dtype(config)  # once: the plan times the dtype the run computes in
    # a model too large for the device streams its blocks instead of failing when loaded
    config, why = fit_offload(model_name, config, nproc=world_size(), compute_dtype=compute, info=info)
    if why is not None:
        log.warning("%s", why)
    plan = (plan_run(model_name, config, nproc=world_size(), compute_dtype=compute)
            if method_info(config.method).kind == "fuse" else None)
    if plan is not None:
        log.info("%s", format_plan(plan))
    store = None
    if config.offload == "disk":  # blocks stay in the checkpoint's files, loaded while used
        from .adapters import get_adapter
        from .device import limit_heap_fragmentation
        from .offload import BlockStore

        limit_heap_fragmentation()
        loaded = load_model(model_name, blocks_on_disk=True, dtype=resolve_weight_dtype(config, compute=compute))
        store = BlockStore(get_adapter(loaded.model), loaded.info["folder"], out / RUN_DIR / "offload")
    else:
        loaded = load_model(model_name, dtype=resolve_weight_dtype(config, compute=compute))
    report = compress(loaded.model, config, tokenizer=loaded.tokenizer, source_model=model_name,
                      checkpoint_dir=out / RUN_DIR, resume=resume, source_fingerprint=source_fingerprint(model_name),
                      store=store, compute_dtype=compute)
    if plan is not None:
        report.plan = {"predicted_seconds": plan.seconds_total, "measured_seconds": report.seconds,
                       "predicted_peak_bytes": plan.peak_bytes,
                       "measured_peak_bytes": report.memory.get("measured_peak_bytes"), "plan": plan.to_dict()}
        log.info("plan vs run: %.0f s predicted, %.0f s measured; peak %.2f GiB predicted, %.2f GiB measured",
                 plan.seconds_total, report.seconds, plan.peak_bytes / 2**30,
                 (report.memory.get("measured_peak_bytes") or 0) / 2**30)
    if evaluate:
        res = evaluate_perplexity(loaded.model, loaded.tokenizer, desc="perplexity (compressed, in memory)",
                                  store=store, **(eval_kwargs or {}))
        report.evaluation["wikitext2"] = res.to_dict()
        log.info("WikiText-2 PPL of the compressed model: %.3f", res.ppl)
    t = time.perf_counter()
    meta = {"method": config.method, "source_model": model_name, "removed": report.removed, "kept": report.kept,
            "original_num_hidden_layers": report.original_layers, "config": config.to_dict(), "command": command}

    def write_extra(folder: Path) -> None:
        report.evaluation["export_seconds"] = time.perf_counter() - t
        write_report(report, folder)

    # out holds only the run folder now (or old content the user allowed to be replaced)
    if is_main():
        export_model(loaded.model, loaded.tokenizer, out, metadata=meta, overwrite=True, write_extra=write_extra,
                     store=store)
    barrier()
    return report


def run_search(model_name: str, config: CompressConfig, out: str | Path, *, fitness: str | None = None,
               overwrite: bool = False, resume: bool = False, command: str | None = None) -> dict[str, Any]:
    """``fusegpt search``: the block-set search (fusegpt.methods.search) of ``model_name`` into ``out``:
    ``search.json`` (every evaluated set, its fitness and time; the best set and the command that fuses it) and
    ``search.png``. Every evaluation is appended to ``out/search-records.jsonl`` as it finishes; ``resume`` replays
    them (same settings, refused otherwise) and continues where the interrupted search stopped."""
    import dataclasses

    from .api import search
    from .distributed import barrier, is_main
    from .methods.search import FITNESS
    from .models import load_model, source_fingerprint
    from .plots import plot_search
    from .runs import RecordLog, atomic_write_json, check_settings

    out = Path(out)
    kind = fitness or config.method_options("search").fitness
    if kind not in FITNESS:
        raise ValueError(f"--fitness must be one of {FITNESS}, got {kind!r}")
    config = dataclasses.replace(config, method="evopress" if kind == "drop" else "fusegpt-evo", blocks=None)
    settings_path, records = out / "search-settings.json", RecordLog(out / "search-records.jsonl")
    if resume:
        if (out / "search.json").is_file():
            raise OutputExistsError(f"the search in {str(out)!r} has finished already (search.json is there)")
        if not settings_path.is_file():
            raise OutputExistsError(f"--resume: {str(out)!r} holds no unfinished search (search-settings.json); "
                                    "run without --resume to start one")
    elif is_main():
        check_output_dir(out, overwrite)
    preflight(model_name, config)
    settings = {"model": source_fingerprint(model_name), "fitness": kind,
                "config": {k: v for k, v in config.to_dict().items() if k not in ("device", "offload_device")}}
    if resume:
        check_settings(settings_path, settings, what=f"search in {str(out)!r}")
    elif is_main():  # under torch.distributed rank 0 alone writes --out
        out.mkdir(parents=True, exist_ok=True)
        for name in ("search-records.jsonl", "search.json", "search.png"):
            (out / name).unlink(missing_ok=True)
        atomic_write_json(settings_path, settings)
    barrier()  # the other ranks read the records only once rank 0 has cleared or kept them
    compute = resolve_compute_dtype(config)
    loaded = load_model(model_name, dtype=resolve_weight_dtype(config, compute=compute))
    res = search(loaded.model, config, fitness=kind, tokenizer=loaded.tokenizer, records=records,
                 compute_dtype=compute)
    blocks_cmd = (f"fusegpt compress {model_name} --blocks {','.join(map(str, res.order))}"
                  f"{'' if config.preset in (None, 'cpu') else ' --preset ' + config.preset} --out OUT")
    data = {"model": model_name, "command": command, "fitness": kind, "config": config.to_dict(),
            "options": dataclasses.asdict(config.method_options("search")), "result": res,
            "compress_best": blocks_cmd, "versions": versions()}
    if is_main():
        atomic_write_json(out / "search.json", data)
        plot_search(res.generations, res.evaluations, res.seed_fitness, out / "search.png",
                    title=f"{model_name}: {res.k} of {res.num_blocks} blocks, {kind} fitness")
    barrier()
    return data
