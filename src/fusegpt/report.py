"""Reports as dataclasses -> JSON (atomic writes), and run metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["to_jsonable", "atomic_write_bytes", "write_json", "write_text", "versions", "format_table", "recovery"]


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (temp file in the same folder, fsync, then rename)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder: after a crash
    the file holds either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def recovery(naive_ppl: float, ppl: float, dense_ppl: float) -> float | None:
    """Share of the naive method's damage that a method recovers, in log-PPL (= mean NLL):
    (ln PPL_naive - ln PPL) / (ln PPL_naive - ln PPL_dense). 1 = back to dense, 0 = no better than naive."""
    import math

    den = math.log(naive_ppl) - math.log(dense_ppl)
    if den == 0:
        return None
    return (math.log(naive_ppl) - math.log(ppl)) / den


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "fusegpt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (floats to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])
