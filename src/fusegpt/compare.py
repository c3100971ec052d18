"""``fusegpt compare``: every method at every sparsity on the same calibration samples and the same evaluation.

The model is loaded once; each (method, sparsity) run compresses a fresh deep copy with the same calibration
windows (sampled once from the shared config), then the result is evaluated under one perplexity protocol (and
optionally zero-shot tasks). Drop-only methods that pick the same blocks give the same model, so their
evaluation is shared. Rows are appended to ``rows.jsonl`` as they finish; an interrupted run continues with
``resume=True``. The naive reference for ``recovery`` is ``drop-mi`` at the same sparsity (the blocks FuseGPT's
Macro Influence selects, removed without fusion): recovery = (ln PPL_naive - ln PPL) / (ln PPL_naive - ln PPL_dense)
(:func:`fusegpt.report.recovery`, the definition used throughout docs/RESULTS.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .api import calibration_windows, compress, preflight
from .config import CompressConfig
from .options import option_specs
from .evaluate import evaluate_perplexity
from .evaluate.perplexity import perplexity_windows
from .export import OutputExistsError, check_writable, export_model
from .methods import method_info, method_names
from .runs import RecordLog, check_settings
from .report import format_table, recovery, to_jsonable, versions, write_json, write_text

log = logging.getLogger(__name__)

__all__ = ["CompareRow", "run_compare", "write_compare", "compress_command", "task_scores", "NAIVE"]

NAIVE = "drop-mi"
# compare-level settings that must match when a run is resumed
_RESUME_KEYS = ("model", "config", "eval", "tasks", "limit")


@dataclass
class CompareRow:
    method: str
    sparsity: float
    removed: list[int]
    params: int
    layers: int
    ppl: float
    seconds: float
    command: str
    kind: str = ""
    recovery: float | None = None  # derived from the PPLs when compare.json is written
    eval_seconds: float = 0.0
    eval_shared_with: str | None = None
    tasks: dict[str, float] = field(default_factory=dict)
    task_average: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def task_scores(results: dict[str, dict], tasks: Sequence[str]) -> dict[str, float]:
    """One number per task: acc_norm where lm-eval reports it, else acc (groups such as mmlu: their acc)."""
    out = {}
    for t in tasks:
        r = results.get(t, {})
        v = r.get("acc_norm,none", r.get("acc,none"))
        if v is not None:
            out[t] = float(v)
    return out


def _flag_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def compress_command(model: str, cfg: CompressConfig, out: str = "OUT") -> str:
    """The ``fusegpt compress`` command that reproduces one compare row (flags for keys that differ from the
    preset)."""
    preset = cfg.preset or "cpu"
    ref = CompressConfig.from_preset(preset).to_dict()
    skip = {"method", "sparsity", "remove", "blocks", "preset", "device", "offload_device"}
    flags = [f"--method {cfg.method}", f"--sparsity {cfg.sparsity}", f"--preset {preset}"]
    for k, v in cfg.to_dict().items():
        if k in skip or ref.get(k) == v or k == "options":
            continue
        if isinstance(v, bool):
            flags.append(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}")
            continue
        flags.append(f"--{k.replace('_', '-')} {_flag_value(v)}")
    for spec in option_specs():  # per-method options that differ from their defaults
        v = cfg.options.get(spec.group, {}).get(spec.name, spec.default)
        if v != spec.default:
            flags.append((spec.flag if v else f"--no-{spec.flag[2:]}") if isinstance(v, bool)
                         else f"{spec.flag} {_flag_value(v)}")
    return f"fusegpt compress {model} " + " ".join(flags) + f" --out {out}"


def _rows_log(out: Path) -> RecordLog:
    return RecordLog(out / "rows.jsonl")


def _read_rows(out: Path) -> list[CompareRow]:
    rows = []
    for rec in _rows_log(out).read():
        try:
            rows.append(CompareRow(**rec))
        except TypeError:
            log.warning("ignoring a row of %s written by another version", out / "rows.jsonl")
    return rows


def _prepare_out(out: Path, settings: dict, *, resume: bool, overwrite: bool) -> list[CompareRow]:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} exists and is a file; choose another --out")
    state = out / "compare-settings.json"
    if out.is_dir() and any(out.iterdir()):
        if resume and state.is_file():
            check_settings(state, settings, what=f"compare in {str(out)!r}", keys=_RESUME_KEYS)
            return _read_rows(out)
        if not overwrite:
            raise OutputExistsError(
                f"output folder {str(out)!r} is not empty; pass --resume to continue an interrupted compare there, "
                "--overwrite to start again, or choose another --out")
        for name in ("rows.jsonl", "compare.json", "compare.md", "pareto.png", "compare-settings.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(state, settings)
    return []


def run_compare(
    model_name: str,
    *,
    sparsities: Sequence[float],
    methods: Sequence[str],
    base: CompressConfig,
    out: str | os.PathLike,
    eval_kwargs: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    save_models: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    quantize: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the comparison and write compare.json / compare.md / pareto.png into ``out``; returns the JSON.

    ``quantize``: quantization schemes (``fusegpt.quantize``); every row (dense included) gets a companion row
    ``METHOD+SCHEME``: its model merged and quantized on the same calibration windows, then evaluated the same way
    (needs llm-compressor: run compare in the quantization environment)."""
    from .device import resolve_device

    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {', '.join(method_names())}")
    if quantize:
        from .quantize import get_scheme, require_llmcompressor

        for q in quantize:
            get_scheme(q)
        require_llmcompressor()
    bad = [s for s in sparsities if not 0 < s < 1]
    if bad:
        raise ValueError(f"sparsities must be in (0, 1), got {bad}")
    methods = [NAIVE] + [m for m in dict.fromkeys(methods) if m != NAIVE]  # the naive reference runs first
    eval_kwargs = {"seqlen": 256, "max_windows": 128, "batch_size": 4, **(eval_kwargs or {})}
    base = copy.deepcopy(base)
    if base.preset is None:
        base.preset = "cpu"
    settings = {"model": model_name, "config": {k: v for k, v in base.to_dict().items()
                                                 if k not in ("method", "sparsity", "remove", "device")},
                "eval": eval_kwargs, "tasks": list(tasks or []), "limit": limit,
                "sparsities": list(sparsities), "methods": list(methods), "quantize": list(quantize)}
    out = Path(out)
    check_writable(out)
    if tasks:
        from .evaluate.zeroshot import require_lm_eval

        require_lm_eval()
    if base.offload == "disk":
        raise ValueError("compare holds the model in memory to run every method on it; use --offload cpu")
    # every refusal before the first write or load (the largest sparsity removes the most blocks)
    preflight(model_name, dataclasses.replace(base, sparsity=max(sparsities), remove=None, method=NAIVE))
    rows = _prepare_out(out, settings, resume=resume, overwrite=overwrite)
    have = {(r.method, r.sparsity) for r in rows}
    # a row is to do when it, or one of its quantized companions, is missing (a compression is deterministic)
    todo = [(m, s) for s in sorted(sparsities) for m in methods
            if (m, s) not in have or any((f"{m}+{q}", s) not in have for q in quantize)]
    dev = resolve_device(device)
    dense_todo = ("dense", 0.0) not in have or any((f"dense+{q}", 0.0) not in have for q in quantize)
    if todo or dense_todo:  # else everything finished earlier: re-render only
        rows += _run_rows(model_name, dev, base, settings, todo, have, rows, out, eval_kwargs=eval_kwargs,
                          tasks=tasks, limit=limit, save_models=save_models, quantize=quantize)
    data = {"model": model_name, "device": str(dev), "settings": settings, "naive": NAIVE,
            "dense_ppl": next(r.ppl for r in rows if r.method == "dense"),
            "rows": [to_jsonable(r) for r in rows], "versions": versions()}
    write_compare(data, out)
    return data


def _run_rows(model_name: str, dev, base: CompressConfig, settings: dict, todo: list[tuple[str, float]],
              have: set, done: list[CompareRow], out: Path, *, eval_kwargs: dict[str, Any],
              tasks: Sequence[str] | None, limit: int | None, save_models: Sequence[str],
              quantize: Sequence[str] = ()) -> list[CompareRow]:
    """Load the model once, then the dense row (if missing) and every (method, sparsity) of ``todo``, each with its
    quantized companions (``quantize``) where missing."""
    from .api import resolve_weight_dtype
    from .models import load_model

    loaded = load_model(model_name, device=dev, dtype=resolve_weight_dtype(base, dev))
    original, tok = loaded.model, loaded.tokenizer
    L = original.config.num_hidden_layers
    # + held-out windows after the calibration rows for the methods that search on unseen text (one draw for all)
    heldout = max([method_info(m).heldout(base) for m, _ in todo if method_info(m).heldout is not None] or [0])
    calib_all = calibration_windows(tok, base, heldout=heldout)
    calib = calib_all[: base.nsamples]
    windows = perplexity_windows(tok, "wikitext2", eval_kwargs["seqlen"], eval_kwargs["max_windows"])

    def evaluate(model) -> tuple[float, float, dict[str, float], float | None]:
        t = time.perf_counter()
        ppl = evaluate_perplexity(model, tok, desc="perplexity", windows=windows, **eval_kwargs).ppl
        scores, avg = {}, None
        if tasks:
            from .evaluate.zeroshot import evaluate_tasks

            res = evaluate_tasks(model, tok, list(tasks), limit=limit, batch_size=eval_kwargs["batch_size"] * 4)
            scores = task_scores(res["results"], res["requested"])
            avg = sum(scores.values()) / len(scores) if scores else None
        return ppl, time.perf_counter() - t, scores, avg

    new: list[CompareRow] = []

    def keep(row: CompareRow) -> None:
        _rows_log(out).append(row)
        new.append(row)

    def quantized(method: str, s: float, model, base_row: CompareRow) -> None:
        """The companion rows ``method+scheme`` of one row: merged, quantized on the calibration windows, evaluated."""
        from .export import merge_and_unload
        from .quantize import quantize_model

        for q in quantize:
            if (f"{method}+{q}", s) in have:
                continue
            qm = merge_and_unload(copy.deepcopy(model))
            t = time.perf_counter()
            chosen = quantize_model(qm, tok, calib, q)
            qs = time.perf_counter() - t
            ppl, es, ts, avg = evaluate(qm)
            qcmd = (f"fusegpt quantize {'OUT' if method != 'dense' else model_name} --scheme {q} --out OUT-{q} "
                    f"--nsamples {calib.shape[0]} --seqlen {calib.shape[1]} --seed {base.seed}")
            cmd = qcmd if method == "dense" else f"{base_row.command} && {qcmd}"
            keep(CompareRow(f"{method}+{q}", s, base_row.removed, base_row.params, base_row.layers, ppl,
                            base_row.seconds + qs, cmd,
                            kind=f"{base_row.kind}+quant", eval_seconds=es, tasks=ts, task_average=avg,
                            extra={"quantize_seconds": qs, **chosen}))
            log.info("compare: %s+%s at %s -> PPL %.3f", method, q, s, ppl)
            del qm

    if ("dense", 0.0) not in have:
        ppl, es, ts, avg = evaluate(original)
        eval_cmd = (f"fusegpt eval {model_name} --seqlen {eval_kwargs['seqlen']} "
                    f"--max-windows {eval_kwargs['max_windows']}")
        keep(CompareRow("dense", 0.0, [], sum(p.numel() for p in original.parameters()), L, ppl, 0.0, eval_cmd,
                        kind="dense", eval_seconds=es, tasks=ts, task_average=avg))
    if quantize:
        dense_row = next(r for r in [*done, *new] if r.method == "dense")
        quantized("dense", 0.0, original, dense_row)
    shared: dict[tuple[int, ...], CompareRow] = {tuple(sorted(r.removed)): r for r in done
                                                if r.kind == "drop" and not r.eval_shared_with}
    for m, s in todo:
        cfg = CompressConfig.from_dict({**settings["config"], "method": m, "sparsity": s, "remove": None,
                                        "device": str(dev)})
        cfg.validate(L)
        work = copy.deepcopy(original)
        log.info("compare: %s at sparsity %s", m, s)
        rep = compress(work, cfg, calib_ids=calib_all, source_model=model_name)
        kind = method_info(m).kind
        if (m, s) in have:  # only quantized companions were missing
            quantized(m, s, work, next(r for r in done if (r.method, r.sparsity) == (m, s)))
            del work
            continue
        key = tuple(sorted(rep.removed))
        if kind == "drop" and key in shared:
            src = shared[key]
            ppl, es, ts, avg, shared_with = src.ppl, 0.0, src.tasks, src.task_average, f"{src.method}@{src.sparsity}"
        else:
            ppl, es, ts, avg = evaluate(work)
            shared_with = None
        extra = {}
        for st in rep.steps:
            if "heal" in st.seconds:
                extra["heal_seconds"] = st.seconds["heal"]
            if "search" in st.extra:  # evopress / fusegpt-evo: what the search found and cost
                found = st.extra["search"]
                extra["search"] = {k: found[k] for k in ("fitness", "seed", "seed_fitness", "best", "best_fitness",
                                                         "seconds", "distinct")}
            if "threshold" in st.extra:
                extra.setdefault("laco_thresholds", []).append(st.extra["threshold"])
        if "laco_thresholds" in extra:
            extra["laco_thresholds"] = sorted(set(extra["laco_thresholds"]), reverse=True)
        row = CompareRow(m, s, rep.removed, rep.params_after, rep.final_layers, ppl, rep.seconds,
                         compress_command(model_name, cfg), kind=kind, eval_seconds=es,
                         eval_shared_with=shared_with, tasks=ts, task_average=avg, extra=extra)
        if kind == "drop" and shared_with is None:
            shared[key] = row
        if m in save_models or "all" in save_models:
            meta = {"method": m, "sparsity": s, "source_model": model_name, "removed": rep.removed,
                    "original_num_hidden_layers": L, "config": cfg.to_dict(), "command": row.command}
            export_model(work, tok, out / "models" / f"{m}-{s}", metadata=meta, overwrite=True)
        keep(row)
        log.info("compare: %s at %s -> PPL %.3f (%.1f s)", m, s, ppl, rep.seconds)
        if quantize:
            quantized(m, s, work, row)
        del work
    return new


def _table(rows: list[dict], with_tasks: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["method", "kind", "sparsity", "blocks removed", "layers", "params (M)", "WikiText-2 PPL",
               "recovery vs naive", "seconds"]
    if with_tasks:
        headers.append("zero-shot avg")
    body = []
    for r in rows:
        rec = "-" if r["recovery"] is None else f"{r['recovery']:.3f}"
        secs = f"{r['seconds']:.1f}"
        if r["extra"].get("heal_seconds") is not None:
            secs += f" (heal {r['extra']['heal_seconds']:.1f})"
        line = [r["method"], r["kind"], r["sparsity"], ",".join(map(str, r["removed"])) or "-", r["layers"],
                f"{r['params'] / 1e6:.2f}", f"{r['ppl']:.2f}", rec, secs]
        if with_tasks:
            line.append("-" if r["task_average"] is None else f"{r['task_average']:.4f}")
        body.append(line)
    return headers, body


def write_compare(data: dict[str, Any], out: Path) -> None:
    """compare.json, compare.md (table + the command of every row) and pareto.png."""
    from .plots import plot_compare

    out = Path(out)
    rows = sorted(data["rows"], key=lambda r: (r["sparsity"], r["ppl"]))
    naive = {r["sparsity"]: r["ppl"] for r in rows if r["method"] == data["naive"]}
    for r in rows:  # derived from the PPLs, so a re-render always uses the current definition
        r["recovery"] = (recovery(naive[r["sparsity"]], r["ppl"], data["dense_ppl"])
                         if r["method"] != "dense" and r["sparsity"] in naive else None)
    write_json(out / "compare.json", {**data, "rows": rows})
    with_tasks = any(r["task_average"] is not None for r in rows)
    headers, body = _table(rows, with_tasks)
    s = data["settings"]
    lines = [
        f"# fusegpt compare: {data['model']}", "",
        f"Device {data['device']}; calibration {s['config']['nsamples']} x {s['config']['seqlen']} tokens of "
        f"{s['config']['calib']} (seed {s['config']['seed']}, scoring on the first {s['config']['score_samples']}), "
        f"preset {s['config'].get('preset')}; WikiText-2 test PPL on {s['eval']['max_windows']} windows of "
        f"{s['eval']['seqlen']} tokens. Recovery = (ln PPL_naive - ln PPL) / (ln PPL_naive - ln PPL_dense), naive = "
        f"{data['naive']} at the same sparsity. Seconds = compression time (scoring, search, training), "
        "not evaluation.", "",
        "```", format_table(headers, body), "```", "",
        "Commands that reproduce each row:", "",
    ]
    for r in rows:
        shared = f" (evaluation shared with {r['eval_shared_with']}: same blocks)" if r["eval_shared_with"] else ""
        lines.append(f"- {r['method']} @ {r['sparsity']}: `{r['command']}`{shared}")
    write_text(out / "compare.md", "\n".join(lines) + "\n")
    plot_compare(rows, out / "pareto.png", dense_ppl=data["dense_ppl"], title=data["model"])
