"""Export: merge fused linears into plain ``nn.Linear``, drop blocks, save a standard checkpoint.

The result loads with stock ``AutoModelForCausalLM.from_pretrained`` and no fusegpt import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .adapters import get_adapter
from .fusion import merge_fused_linears
from .fusion.linear import NonFiniteWeightError
from .report import versions, write_json

__all__ = ["OutputError", "OutputExistsError", "check_output_dir", "check_writable", "drop_blocks", "export_model",
           "merge_and_unload"]


class OutputError(ValueError):
    """The output path cannot be used: not empty (without overwrite), a file, or not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


def check_writable(out: Path) -> None:
    """Probe that ``out`` can be created and written, leaving nothing behind (a temporary folder is made and
    removed in the nearest existing ancestor, or in ``out`` itself when it exists)."""
    probe_in = out
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"cannot create output folder {str(out)!r}: {str(probe_in)!r} is not a folder")
    try:
        tmp = tempfile.mkdtemp(prefix=".fusegpt-write-probe-", dir=probe_in)
        os.rmdir(tmp)
    except OSError as exc:
        raise OutputError(
            f"output folder {str(out)!r} cannot be written ({exc.strerror or exc}); choose another --out"
        ) from None


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty folder (or a file) unless ``overwrite``, and a path that cannot be written; call before
    any long work. Writes nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} is not empty; choose another --out or pass --overwrite to replace it"
        )
    check_writable(out)
    return out


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    bad = [n for n, p in tensors.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteWeightError(f"refusing to export non-finite (NaN/inf) weights in {', '.join(bad[:5])}")


def _save_streamed(model, store, folder: Path) -> None:
    """Sharded safetensors checkpoint written block by block (each loaded, merged, written, released), then the
    other weights (tied ones once), the index, config and generation config: what save_pretrained writes."""
    from safetensors.torch import save_file

    adapter = get_adapter(model)
    blocks = list(adapter.blocks)
    shards = len(blocks) + 1
    weight_map: dict[str, str] = {}
    total = 0

    def write(tensors: dict[str, torch.Tensor], index: int) -> None:
        nonlocal total
        _check_finite(tensors)
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / name,
                  metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    for i, block in enumerate(blocks):
        with store.resident([block]):
            merge_fused_linears(block)
            write({f"{adapter.blocks_prefix}.{i}.{k}": v for k, v in block.state_dict().items()}, i + 1)
    rest, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(adapter.blocks_prefix + ".") or v.is_meta or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        rest[k] = v
    write(rest, shards)
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def merge_and_unload(model):
    """Replace every fused layer of ``model`` by a plain ``nn.Linear`` holding its effective weight (peft's
    ``merge_and_unload``), refusing NaN/inf; returns the model, now a stock transformers module. The one public
    merge step: export and every post-transform (GGUF, quantization) start from its result."""
    merge_fused_linears(model)
    _check_finite(dict(model.named_parameters()))
    return model


def drop_blocks(model, blocks: Sequence[int]) -> list[int]:
    """Plain removal of blocks (indices of the model as it is now). Returns the kept indices."""
    return get_adapter(model).remove_blocks(blocks)


def export_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    store=None,
) -> Path:
    """Merge fused layers, then save model + tokenizer + ``fusegpt.json`` (+ whatever ``write_extra(folder)``
    writes: reports, plots) to ``out_dir`` atomically: the folder appears complete or not at all. A model with
    non-finite weights is never written. ``store``: the BlockStore of a model whose blocks live on disk; they are
    then merged and written one at a time (one shard per block, with the standard index file)."""
    out = check_output_dir(out_dir, overwrite)
    if store is None:
        merge_and_unload(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.use_cache = True
        if store is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_streamed(model, store, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "fusegpt.json", {**metadata, "num_hidden_layers": model.config.num_hidden_layers,
                                          "versions": versions()})
        if write_extra is not None:
            write_extra(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
