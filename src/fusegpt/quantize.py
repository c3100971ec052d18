"""Weight quantization of a checkpoint (a FuseGPT export or a dense model) through llm-compressor.

Quantization is a post-transform: it runs on a merged model (``fusegpt.export.merge_and_unload``: plain linears
only) and the export writes what it produced. The kernels and the format are llm-compressor's and
compressed-tensors' (GPTQ, one layer at a time on calibration activations, as their sequential pipeline does);
nothing here quantizes a weight itself. The checkpoint it writes is a compressed-tensors folder that stock
transformers loads (with the ``compressed-tensors`` package) and vLLM serves.

llm-compressor 0.14 pins ``transformers<=5.17``: install it in its own environment (``make setup-quant``, or
``pip install 'fusegpt[quant]'``, which resolves transformers to 5.17). The folders it writes load in any
environment with ``compressed-tensors`` (a dependency of fusegpt).

Schemes are registered (:func:`register_scheme`); a scheme turns calibration windows and a model into the
library's recipe. docs/METHOD.md ("Weight quantization") says why these libraries and what each scheme stores.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "QuantizeError", "QuantScheme", "register_scheme", "scheme_names", "get_scheme", "require_llmcompressor",
    "quantize_model", "quantize_checkpoint", "QuantizeReport", "checkpoint_bytes",
]

log = logging.getLogger(__name__)

LLMCOMPRESSOR_HINT = (
    "fusegpt quantize needs llm-compressor, which pins transformers<=5.17: install it in its own environment "
    "with `make setup-quant` (then run .venv-quant/bin/fusegpt quantize ...), or `pip install 'fusegpt[quant]'` "
    "in an environment where transformers may be 5.17"
)


class QuantizeError(ValueError):
    """Quantization cannot run as asked (missing library, unknown scheme, a result that does not reload)."""


@dataclass(frozen=True)
class QuantScheme:
    name: str
    summary: str
    weight_bits: int
    group_size: int | None  # preferred weights per scale (None = one scale per output channel)
    # (model, module names left in floating point, group size) -> llm-compressor recipe
    recipe: Callable[[Any, list[str], int | None], Any]


_SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    if scheme.name in _SCHEMES:
        raise ValueError(f"quantization scheme {scheme.name!r} is already registered")
    _SCHEMES[scheme.name] = scheme
    return scheme


def scheme_names() -> list[str]:
    return sorted(_SCHEMES)


def get_scheme(name: str) -> QuantScheme:
    try:
        return _SCHEMES[name]
    except KeyError:
        raise QuantizeError(f"unknown quantization scheme {name!r}; choose one of {', '.join(scheme_names())}") \
            from None


def require_llmcompressor():
    try:
        import llmcompressor
    except ImportError:
        raise QuantizeError(LLMCOMPRESSOR_HINT) from None
    return llmcompressor


def group_size_for(model, ignore: list[str], preferred: int) -> int:
    """The largest of ``preferred``, ``preferred / 2``, ... (>= 16) that divides the input width of every
    quantized linear: SmolLM2's hidden size 576 = 4.5 x 128 takes groups of 64 (a group never spans two rows'
    worth of unrelated inputs, and compressed-tensors refuses widths its groups do not divide)."""
    from torch import nn

    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in ignore}
    g = preferred
    while g >= 16:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    raise QuantizeError(f"no group size in {preferred}..16 divides every linear's input width {sorted(widths)}")


def _gptq(bits: int):
    def recipe(model, ignore: list[str], group_size: int | None):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        if group_size is None:
            weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
        else:
            weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                       group_size=group_size)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)

    return recipe


register_scheme(QuantScheme(
    "gptq-w4a16", "GPTQ, 4-bit symmetric integer weights, one scale per group of 128 inputs (or the largest "
    "power-of-two group that divides the width), 16-bit activations; compressed-tensors pack-quantized "
    "(llm-compressor's W4A16)", 4, 128, _gptq(4)))
register_scheme(QuantScheme(
    "gptq-w8a16", "GPTQ, 8-bit symmetric integer weights, one scale per output channel, 16-bit activations; "
    "compressed-tensors pack-quantized (llm-compressor's W8A16)", 8, None, _gptq(8)))


def _unquantized_modules(model) -> list[str]:
    """The output head stays in floating point (as in llm-compressor's examples; tied to the embeddings here)."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is head]
    return names or ["lm_head"]


def quantize_model(model, tokenizer, calib_ids: torch.Tensor, scheme: str) -> dict[str, Any]:
    """Quantize the linears of a merged ``model`` in place with ``scheme`` on ``calib_ids`` ([N, T] token ids).
    Afterwards ``model.save_pretrained`` writes the compressed-tensors format (llm-compressor wraps it).
    Returns what was chosen (group size, modules left in floating point)."""
    require_llmcompressor()
    from datasets import Dataset
    from llmcompressor import oneshot

    from .fusion import FusedLinear

    if any(isinstance(m, FusedLinear) for m in model.modules()):
        raise QuantizeError("the model still holds fused layers: merge them first (fusegpt.merge_and_unload)")
    s = get_scheme(scheme)
    ignore = _unquantized_modules(model)
    group = group_size_for(model, ignore, s.group_size) if s.group_size is not None else None
    ds = Dataset.from_dict({"input_ids": calib_ids.tolist(), "attention_mask": torch.ones_like(calib_ids).tolist()})
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=s.recipe(model, ignore, group),
            max_seq_length=calib_ids.shape[1], num_calibration_samples=calib_ids.shape[0],
            shuffle_calibration_samples=False)
    return {"weight_bits": s.weight_bits, "group_size": group, "not_quantized": ignore}


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weight files of a checkpoint folder (safetensors / bin / gguf)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))


@dataclass
class QuantizeReport:
    source: str
    out: str
    scheme: str
    summary: str
    weight_bits: int
    group_size: int | None
    not_quantized: list[str]
    dtype: str
    calibration: dict[str, Any]
    seconds: float
    bytes_before: int
    bytes_after: int
    params: int
    verification: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=windows).logits.float()


def quantize_checkpoint(
    source: str | Path, out: str | Path, *, scheme: str, calib: str = "wikitext2-valid", nsamples: int = 128,
    seqlen: int = 256, seed: int = 0, dtype: str = "bf16", overwrite: bool = False,
) -> QuantizeReport:
    """Quantize the checkpoint ``source`` (alias, .gguf or folder) and write a compressed-tensors checkpoint to
    ``out`` (atomically; never over a non-empty folder without ``overwrite``). ``dtype``: storage of what stays in
    floating point (embeddings, norms, scales). Verified before success: the written folder reloads in
    transformers and its logits equal the in-memory quantized model's (within ``dtype`` rounding)."""
    from transformers import AutoModelForCausalLM

    from . import __version__
    from .data import check_window_count, load_text, sample_windows, tokenize_text
    from .export import check_output_dir, export_model, merge_and_unload
    from .models import inspect_model, load_model, resolve_source
    from .report import versions, write_json

    llmc = require_llmcompressor()
    s = get_scheme(scheme)
    if dtype not in _DTYPES:
        raise QuantizeError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = check_output_dir(out, overwrite)
    # the calibration text and window count are checked with the model's tokenizer before any weight loads
    ids = tokenize_text(inspect_model(source).tokenizer, load_text(calib))
    check_window_count(ids.numel(), nsamples, seqlen, f"calibration source {calib!r}")
    calib_ids = sample_windows(ids, nsamples, seqlen, torch.Generator().manual_seed(seed))
    calibration = {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    loaded = load_model(source)
    model, tok = loaded.model, loaded.tokenizer
    merge_and_unload(model)
    check = calib_ids[:2, : min(seqlen, 128)]
    dense = _logits(model, check)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    chosen = quantize_model(model, tok, calib_ids, scheme)
    seconds = time.perf_counter() - t0
    # the reference for the reload check: the quantized model with its floating-point tensors rounded to the
    # storage dtype, computed in fp32 (both sides then differ only by what the format stores, not by bf16 math)
    model.to(_DTYPES[dtype]).to(torch.float32)
    expect = _logits(model, check)
    model.to(_DTYPES[dtype])
    src = resolve_source(source)
    folder = Path(loaded.info["folder"])
    if (folder / "fusegpt.json").is_file():
        meta = json.loads((folder / "fusegpt.json").read_text())
        meta.pop("versions", None)
        meta.pop("num_hidden_layers", None)
    else:
        meta = {"source_model": str(src.name)}
    meta["quantization"] = {"scheme": scheme, **chosen, "library": f"llmcompressor {llmc.__version__}", "dtype": dtype,
                            "calibration": calibration, "quantized_from": str(source)}
    export_model(model, tok, out, metadata=meta, overwrite=overwrite)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    reread = _logits(got, check)
    scale = expect.abs().max().item() or 1.0
    diff = (reread - expect).abs().max().item() / scale
    tol = 1e-5 if dtype == "fp32" else 2e-2
    verification = {
        "reload_max_logit_diff_over_scale": diff, "tolerance": tol,
        "ok": diff <= tol and bool(torch.isfinite(reread).all()),
        "vs_unquantized_max_logit_diff_over_scale":
            (expect - dense).abs().max().item() / (dense.abs().max().item() or 1.0),
        "vs_unquantized_top1_agreement": (expect.argmax(-1) == dense.argmax(-1)).float().mean().item(),
        "windows": list(check.shape),
    }
    if not verification["ok"]:
        raise QuantizeError(f"{out}: the written checkpoint does not reproduce the quantized model (max |logit "
                            f"diff| / scale {diff:.3g} > {tol}); the folder is left for inspection")
    rep = QuantizeReport(
        source=str(source), out=str(out), scheme=scheme, summary=s.summary, **chosen, dtype=dtype,
        calibration=calibration, seconds=seconds,
        bytes_before=checkpoint_bytes(folder), bytes_after=checkpoint_bytes(out),
        params=params, verification=verification,
        versions={**versions(), "fusegpt": __version__, "llmcompressor": llmc.__version__},
    )
    write_json(out / "quantize_report.json", rep.to_dict())
    return rep
