"""Command line: a thin layer over the API (arguments are passed on by keyword)."""

from __future__ import annotations

import argparse
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
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 20,21,22, got {text!r}")


def _windows(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-windows takes a number or 'all', got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError("--max-windows must be >= 1")
    return n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_ppl(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="wikitext2", help="evaluation text (default: wikitext2)")
    p.add_argument("--seqlen", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--max-windows", type=_windows, default=128, help="windows to score, or 'all' (default 128)")
    p.add_argument("--batch-size", type=int, default=4)


# ---- eval --------------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .evaluate import evaluate_perplexity
    from .models import load_model
    from .report import format_table, write_json

    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
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


# ---- drop --------------------------------------------------------------------------------------------------------
def cmd_drop(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .evaluate import evaluate_perplexity
    from .export import check_output_dir, drop_blocks, export_model
    from .models import load_model

    check_output_dir(args.out, args.overwrite)
    loaded = load_model(args.model, device=resolve_device(args.device))
    n = loaded.model.config.num_hidden_layers
    kept = drop_blocks(loaded.model, args.blocks)
    meta = {"method": "drop", "source_model": args.model, "removed": sorted(set(args.blocks)),
            "kept_original_indices": kept, "original_num_hidden_layers": n}
    if args.eval:
        res = evaluate_perplexity(loaded.model, loaded.tokenizer)
        meta["wikitext2_ppl"] = res.ppl
        print(f"WikiText-2 PPL after removing {sorted(set(args.blocks))}: {res.ppl:.3f}")
    out = export_model(loaded.model, loaded.tokenizer, args.out, metadata=meta, overwrite=args.overwrite)
    print(f"wrote {out} ({len(kept)} of {n} blocks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fusegpt", description="Make causal LMs shallower with FuseGPT.")
    parser.add_argument("--version", action="version", version=f"fusegpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="WikiText-2 perplexity of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF folder ({DEFAULT_MODEL})")
    _add_ppl(p)
    p.add_argument("--json", type=Path, help="write the result as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("drop", help="remove blocks (no fusion) and export a checkpoint")
    p.add_argument("model")
    p.add_argument("--blocks", type=_int_list, required=True, help="0-based block indices, e.g. 20,21,22")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--eval", action="store_true", help="print WikiText-2 PPL of the result")
    _add_common(p)
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("demo", help="the main job on the embedded default model")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    args.model, args.source, args.seqlen, args.max_windows, args.batch_size = DEFAULT_MODEL, "wikitext2", 256, 128, 4
    args.json = args.out / "eval.json"
    return cmd_eval(args)


def main(argv: list[str] | None = None) -> int:
    _offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    from .adapters import UnsupportedModelError
    from .data import DataSourceError
    from .export import OutputExistsError
    from .models import ModelSourceError

    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except (ModelSourceError, DataSourceError, UnsupportedModelError, OutputExistsError, ValueError, IndexError) as exc:
        print(f"fusegpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusegpt: interrupted", file=sys.stderr)
        return 130
    log.debug("done in %.1f s", time.perf_counter() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
