"""Command line: a thin layer over the API (arguments are passed on by keyword)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("fusegpt")

DEFAULT_MODEL = "smollm2-135m"


def _offline() -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "accelerate", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from .device import set_threads

    set_threads(args.threads)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        msg = f"expected comma-separated block indices like 20,21,22, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _windows(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-windows takes a number or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--max-windows must be >= 1") from None
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}") from None
    return n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads, >= 1 (default: torch's choice)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_ppl(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="wikitext2", help="evaluation text (default: wikitext2)")
    p.add_argument("--seqlen", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--max-windows", type=_windows, default=128, help="windows to score, or 'all' (default 128)")
    p.add_argument("--batch-size", type=int, default=4)


# ---- eval --------------------------------------------------------------------------------------------------------
def _gguf_source(model: str):
    """(checkpoint folder, source GGUF or None, kept original blocks or None) of an export's input."""
    from .models import converted_folder, resolve_source

    folder = Path(model)
    meta_path = folder / "fusegpt.json"
    if folder.is_dir() and meta_path.is_file():  # written by compress / drop: carry the source GGUF's metadata
        meta = json.loads(meta_path.read_text())
        source, kept = meta.get("source_model"), meta.get("kept", meta.get("kept_original_indices"))
        try:
            src = resolve_source(source) if source else None
        except (ValueError, OSError):
            src = None
        return folder, (src.path if src is not None and src.kind == "gguf" else None), kept
    src = resolve_source(model)
    if src.kind == "gguf":  # a dense GGUF model: its converted folder (made on first use)
        return converted_folder(src), src.path, None
    return src.path, None, None


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_writable
    from .gguf_export import check_gguf_output, write_gguf
    from .report import write_json

    check_gguf_output(args.gguf, args.overwrite)
    check_writable(args.gguf.parent)
    folder, source, kept = _gguf_source(args.model)
    summary = write_gguf(folder, args.gguf, qtype=args.type, source_gguf=source, kept=kept,
                         overwrite=args.overwrite)
    v = summary["verification"]
    print(f"wrote {summary['gguf']} ({summary['type']}, {summary['bytes'] / 2**20:.1f} MiB, {summary['blocks']} "
          f"blocks, metadata from {summary['metadata_from']}); transformers reads it back: max |logit diff| / scale "
          f"{v['max_logit_diff_over_scale']:.2g}, top-1 agreement {v['top1_agreement']:.3f}")
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .export import check_output_dir
    from .quantize import get_scheme, quantize_checkpoint, require_llmcompressor
    from .report import write_json

    get_scheme(args.scheme)  # fail fast: the scheme, the library, the output folder
    require_llmcompressor()
    check_output_dir(args.out, args.overwrite)
    rep = quantize_checkpoint(args.model, args.out, scheme=args.scheme, calib=args.calib, nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    v = rep.verification
    print(f"wrote {rep.out} ({rep.scheme}, {rep.bytes_after / 2**20:.1f} MiB of weights, was "
          f"{rep.bytes_before / 2**20:.1f} MiB; {rep.seconds:.0f} s on {rep.calibration['nsamples']} x "
          f"{rep.calibration['seqlen']} calibration tokens); reloads with max |logit diff| / scale "
          f"{v['reload_max_logit_diff_over_scale']:.2g}; top-1 agreement with the unquantized model "
          f"{v['vs_unquantized_top1_agreement']:.3f}")
    if args.json:
        write_json(args.json, rep.to_dict())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .evaluate import evaluate_perplexity
    from .export import check_writable
    from .models import inspect_model, load_model
    from .report import format_table, write_json

    device = resolve_device(args.device)
    tasks = None
    if args.tasks:  # fail fast, before loading: the extra, then the task names
        from .evaluate.zeroshot import require_lm_eval, resolve_tasks

        require_lm_eval()
        tasks = resolve_tasks([t for t in args.tasks.split(",") if t])
    info = inspect_model(args.model)
    if tasks is None and info.max_positions is not None and args.seqlen > info.max_positions:
        raise ValueError(f"--seqlen {args.seqlen} is longer than the model's maximum context of "
                         f"{info.max_positions} tokens; use --seqlen {info.max_positions} or less")
    if args.json is not None:
        check_writable(Path(args.json).parent)
    loaded = load_model(args.model, device=device)
    if tasks is not None:
        return _eval_tasks(args, loaded, tasks)
    res = evaluate_perplexity(
        loaded.model, loaded.tokenizer, source=args.source, seqlen=args.seqlen, max_windows=args.max_windows,
        batch_size=args.batch_size,
    )
    layers = loaded.model.config.num_hidden_layers
    params = sum(p.numel() for p in loaded.model.parameters())
    print(format_table(
        ["model", "source", "seqlen", "windows", "layers", "params", "PPL", "seconds"],
        [[args.model, res.source, res.seqlen, res.windows, layers, params, res.ppl, round(res.seconds, 1)]],
    ))
    if args.json:
        write_json(args.json, {"model": args.model, "layers": layers, "params": params, "perplexity": res})
    return 0


def _eval_tasks(args: argparse.Namespace, loaded, tasks: list[str]) -> int:
    from .evaluate.zeroshot import evaluate_tasks
    from .report import write_json

    res = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)
    for table in res.pop("table"):
        print(table)
    avg = res["average"]
    print(f"average over {avg['tasks']} tasks: acc {avg['acc']:.4f}, acc_norm {avg['acc_norm']:.4f} "
          f"(acc_norm where the task reports it)")
    print("seconds per task: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    if args.json:
        write_json(args.json, {"model": args.model, **res})
    return 0


# ---- drop --------------------------------------------------------------------------------------------------------
def cmd_drop(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .evaluate import evaluate_perplexity
    from .export import check_output_dir, drop_blocks, export_model
    from .models import inspect_model, load_model

    check_output_dir(args.out, args.overwrite)
    n = inspect_model(args.model).num_blocks
    bad = [b for b in args.blocks if not 0 <= b < n]
    if bad or len(set(args.blocks)) >= n:
        raise ValueError(f"--blocks {args.blocks}: the model has {n} blocks (0..{n - 1}); list distinct indices in "
                         "that range and keep at least one block")
    loaded = load_model(args.model, device=resolve_device(args.device))
    kept = drop_blocks(loaded.model, args.blocks)
    meta = {"method": "drop", "source_model": args.model, "removed": sorted(set(args.blocks)),
            "kept": kept, "original_num_hidden_layers": n}
    if args.eval:
        res = evaluate_perplexity(loaded.model, loaded.tokenizer)
        meta["wikitext2_ppl"] = res.ppl
        print(f"WikiText-2 PPL after removing {sorted(set(args.blocks))}: {res.ppl:.3f}")
    out = export_model(loaded.model, loaded.tokenizer, args.out, metadata=meta, overwrite=args.overwrite)
    print(f"wrote {out} ({len(kept)} of {n} blocks)")
    return 0


# ---- compress ----------------------------------------------------------------------------------------------------
def _choices(name: str) -> list[str]:
    """Accepted values of a config flag, from the registries (methods, losses, coefficient kinds) and the config."""
    from . import config as c

    if name == "--method":
        from .methods import method_names

        return method_names()
    return {"--mode": list(c.MODES), "--train": list(c.TRAIN_MODES), "--loss": list(c.loss_names()),
            "--aux-loss": list(c.loss_names()), "--final-loss": list(c.loss_names()), "--target": list(c.TARGETS),
            "--order": list(c.order_names()),
            "--coef": list(c.coef_kinds()), "--compute-dtype": list(c.COMPUTE),
            "--dtype": list(c.WEIGHT_DTYPES), "--offload": list(c.OFFLOADS),
            "--cache-dtype": ["auto", "fp32"], "--grad-checkpoint": ["auto", "on", "off"]}[name]


_CHOICE_FLAGS = ("--method", "--mode", "--train", "--loss", "--aux-loss", "--final-loss", "--target", "--order",
                 "--coef", "--compute-dtype", "--dtype", "--offload", "--cache-dtype", "--grad-checkpoint")
_CONFIG_FLAGS = [
    # (flag, type, help) -> CompressConfig field of the same name (dashes -> underscores); the flags of
    # _CHOICE_FLAGS list their accepted values in --help and refuse others
    ("--method", str, "compression method (default fusegpt)"),
    ("--sparsity", float, "fraction of blocks to remove, ceil(L * sparsity) (default 0.25)"),
    ("--remove", int, "remove exactly K blocks (overrides --sparsity)"),
    ("--mode", str, "iterative (re-score after every removal) or oneshot"),
    ("--order", str, "what ranks blocks for fusegpt's selection: mi (Macro Influence, default), bi (ShortGPT), "
                     "nll (skip-one NLL: SLEB iterative, PPL one-shot) or fisher (squared gradients)"),
    ("--min-gap", int, "keep removed blocks at least this far apart while enough qualify (default 1; 2 = no "
                       "neighbours, less overlap of their groups)"),
    ("--group-size", int, "receiving blocks around the removed one (the paper's G; reference 7)"),
    ("--coef", str, "fusion coefficient: scalar, vector, matrix or lowrank"),
    ("--coef-rank", int, "rank of the low-rank coefficient (reference 128)"),
    ("--lora-rank", int, "rank of the LoRA on receiving weights (reference 128; 0 = none)"),
    ("--train", str, "what distillation trains: coef, coef+lora or full"),
    ("--loss", str, "distillation loss: nmse (per-token normalised MSE, cpu preset), kl-batch (reference), mse, "
                    "cosine, kl-hidden, mse-norm (after the frozen final norm), logit-kl (next-token KL through "
                    "the frozen head)"),
    ("--aux-loss", str, "an auxiliary loss added to --loss with weight --aux-weight"),
    ("--aux-weight", float, "weight of --aux-loss (default 0 = none)"),
    ("--target", str, "distillation target: dense (the original model's hidden state, cached before the first "
                      "removal; cpu preset) or current (the pruned model's group output; paper preset)"),
    ("--final-epochs", int, "after the last fusion, distil the whole model's next-token distributions against the "
                            "dense model's for this many epochs (LoRA + norms on every block; cpu preset 2, "
                            "paper preset 0 = off)"),
    ("--final-lr", float, "learning rate of the final stage (cpu preset 1e-3)"),
    ("--final-nsamples", int, "calibration windows of the final stage (default 0 = the --nsamples windows; more "
                              "adds windows after those)"),
    ("--final-batch-size", int, "sequences per optimizer step of the final stage (default 0 = --batch-size; "
                                "fewer = more, smaller steps on the same windows)"),
    ("--final-topk", int, "keep the final stage's teacher as its k most likely tokens and the rest's mass, computed "
                          "once (default 0 = the full distribution at every step)"),
    ("--final-loss", str, "the final stage's loss against the dense model: logit-kl (next-token KL through the frozen "
                          "head, default) or a hidden-state loss on the final hidden states (nmse, mse-norm, ...)"),
    ("--final-lora-rank", int, "LoRA rank of the final stage (default 0 = --lora-rank)"),
    ("--final-positions", float, "fraction of the token positions whose next-token KL the final stage trains on, "
                                 "drawn per step (default 1 = all; the LM head runs on that fraction)"),
    ("--warmup", float, "linear lr warm-up over this fraction of each distillation's steps (default 0)"),
    ("--clip-grad", float, "clip the gradient norm of the trained parameters (default 0 = off)"),
    ("--epochs", int, "distillation epochs per removal"),
    ("--lr", float, "learning rate of LoRA, norms (and weights with --train full)"),
    ("--coef-lr", float, "learning rate of the fusion coefficients"),
    ("--batch-size", int, "sequences per optimizer step"),
    ("--diverge-factor", float, "a loss past this factor x its first value restores the group, retries at half "
                                "the lr, else keeps plain removal for the step (default 100; 0 = NaN/inf only)"),
    ("--nsamples", int, "calibration sequences"),
    ("--score-samples", int, "calibration sequences used for scoring (the first ones)"),
    ("--seqlen", int, "calibration sequence length in tokens"),
    ("--calib", str, "calibration source: wikitext2-valid, wikitext103-valid, lambada-dev, boolq-passages (raw "
                     "Wikipedia text) or a .txt/.jsonl path"),
    ("--seed", int, "seed of calibration sampling and initialisation"),
    ("--compute-dtype", str, "auto (bf16 only where measured faster), fp32, bf16 or fp16"),
    ("--dtype", str, "dtype of the loaded weights: fp32 (default), bf16 or fp16 (half the memory; trained "
                     "parameters keep fp32 masters while they train; half weights compute in their own dtype), or "
                     "auto (the compute dtype where that is bf16/fp16, else fp32; the cpu preset's)"),
    ("--offload", str, "where cached activations wait: cpu (RAM, default) or disk (files in a work folder in --out)"),
    ("--cache-entries", int, "activation-cache entries kept per cache, >= 3 (default 4; 0 = all, unbounded)"),
    ("--cache-dtype", str, "storage dtype of cached activations: auto (= compute dtype, default) or fp32"),
    ("--grad-checkpoint", str, "recompute block forwards in backward: auto (on when that saves more than 1 GiB and "
                               "memory is short: the phase would take over half the available), on or off"),
]
_COMPARE_SKIP = ("--method", "--sparsity", "--remove")


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for flag, typ, help_text in _CONFIG_FLAGS:
        if flag not in skip:
            choices = _choices(flag) if flag in _CHOICE_FLAGS else None
            meta = "{" + ",".join(choices) + "}" if choices else None
            p.add_argument(flag, type=typ, default=None, choices=choices, metavar=meta, help=help_text)
    _add_option_flags(p)
    p.add_argument("--consolidate", dest="consolidate", action="store_true", default=None,
                   help="merge receiving layers after each step (cpu preset)")
    p.add_argument("--no-consolidate", dest="consolidate", action="store_false",
                   help="keep every coefficient trainable across steps (the reference)")
    p.add_argument("--fold-norms", dest="fold_norms", action="store_true", default=None,
                   help="fold the donor's input-norm gains into its weights before injection")
    p.add_argument("--no-fold-norms", dest="fold_norms", action="store_false", help="inject the donor's weights as is")
    p.add_argument("--blocks", type=_int_list, default=None,
                   help="remove these original block indices in this order, without scoring (ablations)")
    p.add_argument("--preset", default=None, choices=["cpu", "paper"], help="paper or cpu (default cpu)")
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON file of config keys (flags override it)")


def _add_option_flags(p: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """The flags of the per-method options (fusegpt.options), generated from their dataclasses."""
    from .options import option_specs

    for s in option_specs():
        if groups is not None and s.group not in groups:
            continue
        dest = "opt__" + s.flat_key
        if s.type is bool:
            p.add_argument(s.flag, dest=dest, action="store_true", default=None, help=s.help)
            p.add_argument("--no-" + s.flag[2:], dest=dest, action="store_false", help=f"(the opposite of {s.flag})")
            continue
        choices = s.allowed()
        meta = "{" + ",".join(choices) + "}" if choices else s.key.upper().replace("-", "_")
        p.add_argument(s.flag, dest=dest, type=s.type, default=None, choices=choices, metavar=meta,
                       help=f"{s.help} [default {s.default}]" if "default" not in s.help else s.help)


def option_values(args: argparse.Namespace) -> dict:
    """Flat config keys (``laco_layers``) of the per-method option flags given on the command line."""
    return {k[len("opt__"):]: v for k, v in vars(args).items() if k.startswith("opt__") and v is not None}


def config_from_args(args: argparse.Namespace):
    """preset <- config file <- explicit flags."""
    from .config import CompressConfig, load_config_file

    values = load_config_file(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", None) or "cpu"
    for flag, _, _ in _CONFIG_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    values.update(option_values(args))
    if getattr(args, "blocks", None) is not None:
        values["blocks"] = args.blocks
    if args.consolidate is not None:
        values["consolidate"] = args.consolidate
    if getattr(args, "fold_norms", None) is not None:
        values["fold_norms"] = args.fold_norms
    if "remove" in values and "sparsity" not in values:
        values["sparsity"] = None
    if args.device != "auto":
        values["device"] = args.device
    cfg = CompressConfig.from_preset(preset, **values).validate()
    from .methods import get_method

    get_method(cfg.method)  # unknown names fail here, before any loading
    return cfg


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.1,0.25; got {text!r}") from None


# ---- compare -----------------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .methods import method_names

    if args.methods in ("all", None):
        methods = method_names()
    else:  # run_compare refuses unknown names before loading anything
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = None
    if args.tasks:
        from .evaluate.zeroshot import resolve_tasks

        tasks = resolve_tasks([t for t in args.tasks.split(",") if t])
    if not args.sparsity:
        raise ValueError("--sparsity needs at least one value, e.g. 0.1,0.25")
    ns = argparse.Namespace(**vars(args))
    ns.sparsity = max(args.sparsity)  # the shared config; each row sets its own sparsity
    base = config_from_args(ns)
    save = [m.strip() for m in (args.save_models or "").split(",") if m.strip()]
    data = run_compare(args.model, sparsities=args.sparsity, methods=methods, base=base, out=args.out,
                       eval_kwargs={"seqlen": args.eval_seqlen, "max_windows": args.eval_windows},
                       tasks=tasks, limit=args.limit, save_models=save, resume=args.resume,
                       overwrite=args.overwrite, device=args.device,
                       quantize=[q.strip() for q in (args.quantize or "").split(",") if q.strip()])
    print((Path(args.out) / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/compare.md, compare.json, pareto.png ({len(data['rows'])} rows)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import fit_offload, format_plan, plan_run
    from .report import write_json

    cfg = config_from_args(args)
    cfg, why = fit_offload(args.model, cfg, nproc=args.nproc)  # what compress would run: streamed if too large
    rep = plan_run(args.model, cfg, device=args.device, repeats=args.repeats, nproc=args.nproc)
    if why is not None:
        rep.notes.append(why)
    print(format_plan(rep))
    if args.json:
        write_json(args.json, rep.to_dict())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .pipeline import run_search

    cfg = config_from_args(args)
    command = "fusegpt " + " ".join(sys.argv[1:])
    data = run_search(args.model, cfg, args.out, fitness=args.opt__search_fitness, overwrite=args.overwrite,
                      resume=args.resume, command=command)
    r = data["result"]
    print(f"{data['fitness']} fitness, {r.k} of {r.num_blocks} blocks, {r.windows} {'held-out' if r.heldout else ''} "
          f"windows: MI greedy {r.seed} KL {r.seed_fitness:.5f} -> best {r.best} KL {r.best_fitness:.5f} "
          f"({r.distinct} sets evaluated, {r.seconds:.0f} s)")
    print(f"fuse the best set: {data['compress_best']} (with the same config flags)")
    print(f"wrote {args.out}/search.json, search.png")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .pipeline import run_compression

    cfg = config_from_args(args)
    command = "fusegpt " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    rep = run_compression(args.model, cfg, args.out, overwrite=args.overwrite, resume=args.resume,
                          evaluate=not args.no_eval, command=command)
    _print_compress_summary(rep, args.out)
    return 0


def _print_compress_summary(rep, out) -> None:
    from .report import format_table

    ppl = rep.evaluation.get("wikitext2", {}).get("ppl")
    print(format_table(
        ["method", "removed (original idx, in order)", "layers", "params", "PPL", "seconds"],
        [[rep.method, ",".join(map(str, rep.removed)), f"{rep.original_layers}->{rep.final_layers}",
          rep.params_after, ppl if ppl is not None else "-", round(rep.seconds, 1)]],
    ))
    for s in rep.steps:
        if s.retried:
            what = "kept plain removal" if s.fallback else "retried at half the learning rates"
            print(f"warning: step {s.step + 1} (block {s.removed}) diverged ({'; '.join(s.divergence)}): {what}")
    if rep.resumed_after_step:
        print(f"resumed after step {rep.resumed_after_step} of {len(rep.steps)}")
    print(f"wrote {out} (checkpoint, fusegpt_report.json, mi.png, loss.png)")


# ---- bench -------------------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:

    from .benchmark import BenchConfig, bench_models
    from .device import resolve_device
    from .export import check_writable
    from .models import inspect_model, load_model
    from .plots import plot_bench, plot_pareto
    from .report import format_table, to_jsonable, write_json

    device = resolve_device(args.device)
    names = list(args.models) + ([args.vs] if args.vs and args.vs not in args.models else [])
    if len(set(names)) != len(names):
        raise ValueError("each model may be given once")
    for n in names:  # every model must exist and be readable before the first one is loaded
        inspect_model(n)
    for target in (args.json, args.plot):
        if target is not None:
            check_writable(Path(target).parent)
    loaded = {n: load_model(n, device=device) for n in names}
    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                      decode_batches=tuple(args.decode_batches), repeats=args.repeats, dtype=args.dtype,
                      memory=not args.no_memory)
    rep = bench_models({n: lm.model for n, lm in loaded.items()}, cfg, reference=args.vs,
                       names_for_memory={n: n for n in names})
    data = to_jsonable(rep)
    ppl: dict[str, float] = {}
    if args.ppl:
        from .evaluate import evaluate_perplexity

        for n, lm in loaded.items():
            ppl[n] = evaluate_perplexity(lm.model, lm.tokenizer, desc=f"perplexity ({n})").ppl
        data["ppl"] = ppl
    rows = []
    for m in data["models"]:
        row = [m["name"], m["layers"], m["params"], m["prefill"]["median_s"] * 1e3]
        row += [m["decode"][f"b{b}"]["tokens_per_second"] for b in cfg.decode_batches]
        mem = m.get("memory") or {}
        mib = ["-" if mem.get(k) is None else round(mem[k] / 2**20, 1)
               for k in ("peak_rss_over_baseline_bytes", "peak_device_bytes")]
        row += [m["macs_prefill"]["total"] / 1e6, round(m["param_bytes"] / 2**20, 1), *mib]
        rows.append(row)
    print(format_table(["model", "layers", "params", "prefill ms (median)",
                        *[f"decode tok/s b{b}" for b in cfg.decode_batches], "MMACs/token", "param MiB",
                        "inference peak over baseline MiB", "device peak MiB"], rows))
    for c in data["comparisons"]:
        print(f"{c['model']} vs {c['vs']}: " + ", ".join(
            f"{k} measured {c['speedup_measured'][k]:.3f}x / ideal {c['speedup_ideal'][k]:.3f}x = "
            f"{c['measured_over_ideal'][k]:.3f}" for k in c["speedup_measured"]))
    if len(data["comparisons"]) == 1:  # one pair: the figures at top level too
        for key in ("speedup_measured", "speedup_ideal", "measured_over_ideal"):
            data[key] = data["comparisons"][0][key]
    if args.json:
        write_json(args.json, data)
    if args.plot:
        plot_bench(data["models"], args.plot)
        if ppl and data["comparisons"]:
            pts = [(c["model"], c["speedup_measured"]["prefill"], ppl[c["model"]]) for c in data["comparisons"]]
            pts.append((args.vs, 1.0, ppl[args.vs]))
            plot_pareto(pts, Path(args.plot).with_name(Path(args.plot).stem + "-pareto.png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .gguf_export import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="fusegpt", description="Make causal LMs shallower with FuseGPT.")
    parser.add_argument("--version", action="version", version=f"fusegpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="WikiText-2 perplexity of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF folder ({DEFAULT_MODEL})")
    _add_ppl(p)
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks through lm-eval instead of PPL: arc_easy,arc_challenge,piqa,boolq,"
                        "openbookqa,lambada,mmlu (or mmlu_<subject>)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of every task (lm-eval --limit)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint (compressed or dense) as a GGUF file for llama.cpp")
    p.add_argument("model", help="a folder written by compress/drop, an HF folder, a .gguf file or an alias")
    p.add_argument("--gguf", type=Path, required=True, help="output file, ending in .gguf")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES,
                   help="tensor type of the matrices (norms stay f32); q8_0 = llama.cpp's 8-bit blocks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    p.add_argument("--json", type=Path, help="write the summary (bytes, verification) as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_export)

    from .quantize import scheme_names

    p = sub.add_parser("quantize", help="quantize a checkpoint's weights (GPTQ through llm-compressor)")
    p.add_argument("model", help="a folder written by compress/drop, an HF folder, a .gguf file or an alias")
    p.add_argument("--scheme", required=True, choices=scheme_names())
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--calib", default="wikitext2-valid", help="calibration text (default: wikitext2-valid)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="storage of the tensors that stay floating point: embeddings, norms, scales (default bf16)")
    p.add_argument("--json", type=Path, help="write the report as JSON (also OUT/quantize_report.json)")
    _add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("drop", help="remove blocks (no fusion) and export a checkpoint")
    p.add_argument("model")
    p.add_argument("--blocks", type=_int_list, required=True, help="0-based block indices, e.g. 20,21,22")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--eval", action="store_true", help="print WikiText-2 PPL of the result")
    _add_common(p)
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("compress", help="remove blocks with FuseGPT (or another --method) and export")
    p.add_argument("model", help=f"alias, .gguf file or HF folder (e.g. {DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-eval", action="store_true", help="skip the WikiText-2 PPL of the result")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out after its last finished step (same model, config and "
                        "calibration; refused, naming the difference, otherwise)")
    p.set_defaults(command_line=None)
    _add_config_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("search", help="search which blocks to remove: MI-seeded evolution, fitness = KL from the dense "
                                      "model after plain removal (drop) or a cheap fusion (fuse)")
    p.add_argument("model", help=f"alias, .gguf file, HF folder or hub id (e.g. {DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, required=True, help="output folder: search.json, search.png, the records")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in --out")
    _add_config_flags(p, skip=("--method",))
    from .methods.search import FITNESS

    p.add_argument("--fitness", dest="opt__search_fitness", choices=list(FITNESS), default=None,
                   help="drop (plain removal, EvoPress-style) or fuse (after a cheap fusion, FuseGPT-Evo; default)")
    p.add_argument("--generations", dest="opt__search_generations", type=int, default=None, metavar="G",
                   help="= --search-generations")
    p.add_argument("--offspring", dest="opt__search_offspring", type=int, default=None, metavar="K",
                   help="= --search-offspring")
    _add_common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("plan", help="predict a compress run's time and memory before running it (no weights loaded)")
    p.add_argument("model", help=f"alias, .gguf file, HF folder or hub id (e.g. {DEFAULT_MODEL})")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats of each unit (median)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="data-parallel processes of the run (torchrun --nproc-per-node); default 1")
    p.add_argument("--json", type=Path, help="write the plan as JSON")
    _add_config_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="every method at every sparsity on the same data: compare.md/json, pareto.png")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF folder ({DEFAULT_MODEL})")
    p.add_argument("--sparsity", type=_float_list, default=[0.1, 0.25], help="comma-separated (default 0.1,0.25)")
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --resume/--overwrite)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compare in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out")
    p.add_argument("--save-models", default=None, help="export these methods' models to OUT/models (or all)")
    p.add_argument("--eval-seqlen", type=int, default=256, help="PPL window length (default 256)")
    p.add_argument("--eval-windows", type=_windows, default=128, help="PPL windows, or 'all' (default 128)")
    p.add_argument("--quantize", default=None,
                   help="also every row quantized with these schemes (comma-separated, e.g. gptq-w4a16,gptq-w8a16; "
                        "needs llm-compressor: run in .venv-quant)")
    p.add_argument("--tasks", default=None, help="also zero-shot tasks for every row (see fusegpt eval --tasks)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of every task")
    _add_config_flags(p, skip=_COMPARE_SKIP)
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="latency, throughput, memory and MACs; speedups against --vs")
    p.add_argument("models", nargs="+", help="models to measure (alias, .gguf or folder)")
    p.add_argument("--vs", default=None, help="reference model; speedups are reference time / model time")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batches", type=_int_list, default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default=None, help="autocast dtype for timed regions (e.g. bf16 on a GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe (a fresh process per model)")
    p.add_argument("--ppl", action="store_true", help="also WikiText-2 PPL of every model (for the Pareto plot)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="bench.png (and <name>-pareto.png with --ppl)")
    _add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: compress the embedded default model and compare")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo-<time>)")
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress the default model at 25% with the cpu preset, then compare dense / plain removal / FuseGPT."""
    from .config import CompressConfig
    from .evaluate import evaluate_perplexity
    from .export import check_output_dir, drop_blocks
    from .models import load_model
    from .pipeline import run_compression
    from .report import format_table, write_json

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    check_output_dir(out, args.overwrite)
    cfg = CompressConfig.from_preset("cpu", sparsity=args.sparsity).validate()
    cmd = f"fusegpt compress {DEFAULT_MODEL} --preset cpu --sparsity {args.sparsity} --out {out}"
    print(f"[1/3] {cmd}", flush=True)
    rep = run_compression(DEFAULT_MODEL, cfg, out, overwrite=args.overwrite, command=cmd)
    fused_ppl = rep.evaluation["wikitext2"]["ppl"]
    # the second corpus: LAMBADA's test passages (fiction), text the calibration never saw
    second = dict(source="lambada-test", max_windows=64)
    fused = load_model(out)  # the written checkpoint, as stock transformers loads it
    fused_second = evaluate_perplexity(fused.model, fused.tokenizer, desc="LAMBADA (FuseGPT)", **second).ppl
    weights = next(fused.model.parameters()).dtype  # what the written checkpoint was evaluated in
    del fused
    print("[2/3] dense model", flush=True)
    dense = load_model(DEFAULT_MODEL, dtype=weights)  # the dense model and plain removal in the same precision
    dense_params = sum(p.numel() for p in dense.model.parameters())
    dense_ppl = evaluate_perplexity(dense.model, dense.tokenizer, desc="perplexity (dense)").ppl
    dense_second = evaluate_perplexity(dense.model, dense.tokenizer, desc="LAMBADA (dense)", **second).ppl
    print(f"[3/3] plain removal of the same blocks {rep.removed}", flush=True)
    drop_blocks(dense.model, rep.removed)
    drop_params = sum(p.numel() for p in dense.model.parameters())
    drop_ppl = evaluate_perplexity(dense.model, dense.tokenizer, desc="perplexity (plain removal)").ppl
    drop_second = evaluate_perplexity(dense.model, dense.tokenizer, desc="LAMBADA (plain removal)", **second).ppl

    from .report import recovery as _recovery

    recovery = _recovery(drop_ppl, fused_ppl, dense_ppl)
    recovery_second = _recovery(drop_second, fused_second, dense_second)
    rows = [
        ["dense", rep.original_layers, dense_params, dense_ppl, "-", dense_second, "-", "-"],
        ["plain removal", rep.final_layers, drop_params, drop_ppl, 0.0, drop_second, 0.0, 0.0],
        ["FuseGPT (cpu preset)", rep.final_layers, rep.params_after, fused_ppl, recovery, fused_second,
         recovery_second, round(rep.seconds, 1)],
    ]
    table = format_table(["model", "layers", "params", "WikiText-2 PPL", "recovery", "LAMBADA PPL", "recovery",
                          "compress s"], rows)
    print(table)
    print(f"removed blocks (original indices, in order): {rep.removed}; checkpoint and report in {out}")
    write_json(out / "demo.json", {"dense_ppl": dense_ppl, "drop_ppl": drop_ppl, "fusegpt_ppl": fused_ppl,
                                   "recovery": recovery, "removed": rep.removed, "compress_seconds": rep.seconds,
                                   "dense_params": dense_params, "params": rep.params_after,
                                   "second": {"source": second["source"], "windows": second["max_windows"],
                                              "dense_ppl": dense_second,
                                              "drop_ppl": drop_second, "fusegpt_ppl": fused_second,
                                              "recovery": recovery_second},
                                   "compute_dtype": rep.compute_dtype, "weights_dtype": str(weights),
                                   "flops_fraction_of_peak": rep.flops_fraction_of_peak})
    (out / "demo.md").write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    _offline()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a refused argument (2, message already printed)
        return int(exc.code or 0)
    _setup(args)
    from .adapters import UnsupportedModelError
    from .config import ConfigError
    from .data import DataSourceError
    from .evaluate.zeroshot import MissingExtraError
    from .export import OutputError
    from .models import ModelSourceError

    from .distributed import init_from_env, shutdown

    distributed = init_from_env(getattr(args, "device", None))  # under torchrun: join its process group
    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except (ModelSourceError, DataSourceError, UnsupportedModelError, OutputError, ConfigError, MissingExtraError,
            ValueError, IndexError) as exc:
        print(f"fusegpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusegpt: interrupted", file=sys.stderr)
        return 130
    finally:
        if distributed:
            shutdown()
    log.debug("done in %.1f s", time.perf_counter() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
