"""Export: merge fused linears into plain ``nn.Linear``, drop blocks, save a standard checkpoint.

The result loads with stock ``AutoModelForCausalLM.from_pretrained`` and no fusegpt import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .adapters import get_adapter
from .fusion import merge_fused_linears
from .report import versions, write_json

__all__ = ["OutputExistsError", "check_output_dir", "drop_blocks", "export_model"]


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty folder (or a file) unless ``overwrite``; call before any long work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} is not empty; choose another --out or pass --overwrite to replace it"
        )
    return out


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
) -> Path:
    """Merge fused layers, then save model + tokenizer + ``fusegpt.json`` to ``out_dir`` atomically."""
    out = check_output_dir(out_dir, overwrite)
    merge_fused_linears(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "fusegpt.json", {**metadata, "num_hidden_layers": model.config.num_hidden_layers,
                                          "versions": versions()})
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
