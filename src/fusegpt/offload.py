"""Decoder blocks whose weights live on disk (``--offload disk``): loaded one block at a time, released after.

The model is built with its decoder blocks on the ``meta`` device (no memory); embeddings, final norm and head are
loaded normally. A block is materialised from the checkpoint's safetensors files (read with ``safe_open``, only
that block's tensors) when the runner or a method needs it, and released (back to ``meta``) afterwards. A block
whose weights a step changed is written to the run's work folder (its state dict and structure, atomically) and
read from there from then on. Peak memory holds the non-block weights plus the blocks in use (the group span
during fusion), never the whole model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import barrier, is_main
from .fusion.inject import block_spec, rebuild_block

log = logging.getLogger(__name__)

__all__ = ["BlockStore", "ORIGIN_ATTR", "MAPPED_ATTR", "block_origin", "save_tensors_atomic", "is_materialized",
           "map_safetensors"]

ORIGIN_ATTR = "fusegpt_origin"  # original block index, set on every block of an offloaded model


MAPPED_ATTR = "fusegpt_mapped"  # set on parameters that are memory-mapped views of the checkpoint (already checked)

MAP_MIN_BYTES = 1 << 20  # smaller non-block tensors are copied (not worth a mapping)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def map_safetensors(path: str | os.PathLike, names: Sequence[str], dtype: torch.dtype, *,
                    min_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Zero-copy views of ``names`` in a safetensors file (a private, copy-on-write memory map), for the tensors
    stored in ``dtype`` and at least ``min_bytes`` large; the others are left out (the caller copies them).

    A mapped tensor costs memory only for the pages that are read (an embedding lookup reads its rows, not the
    table). Each is checked for NaN/inf here, in slices whose pages are handed back to the kernel afterwards
    (``MADV_DONTNEED``), so the check leaves nothing resident. Raises ValueError naming a non-finite tensor."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + n
    page = mmap.PAGESIZE
    min_bytes = MAP_MIN_BYTES if min_bytes is None else min_bytes
    out: dict[str, torch.Tensor] = {}
    for name in names:
        meta = header.get(name)
        if meta is None or _ST_DTYPES.get(meta["dtype"]) != dtype:
            continue
        b, e = meta["data_offsets"]
        numel = math.prod(meta["shape"])
        if e - b < min_bytes or numel * dtype.itemsize != e - b or (start + b) % dtype.itemsize:
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start + b).view(meta["shape"])
        flat = t.reshape(-1)
        step = max(1, (64 << 20) // dtype.itemsize)
        for i in range(0, numel, step):
            if not torch.isfinite(flat[i:i + step]).all():
                raise ValueError(f"{path}: {name} has non-finite (NaN/inf) weights")
        lo = (start + b) // page * page
        mm.madvise(mmap.MADV_DONTNEED, lo, min(len(mm), start + e) - lo)
        out[name] = t
    return out


def block_origin(block: nn.Module) -> int:
    return int(getattr(block, ORIGIN_ATTR))


def is_materialized(module: nn.Module) -> bool:
    return not any(p.is_meta for p in module.parameters())


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written to a temporary name, fsync'ed, renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class BlockStore:
    """Where the weights of every block of an offloaded model are, and loading/releasing them.

    ``folder``: the checkpoint (safetensors files; block b's tensors are named ``<prefix>.<b>.<name>``);
    ``work``: where changed blocks are written. ``pinned`` blocks stay materialised until unpinned.
    """

    def __init__(self, adapter, folder: str | os.PathLike, work: str | os.PathLike, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.adapter = adapter
        self.folder = Path(folder)
        self.work = Path(work)
        self.prefix = prefix = adapter.blocks_prefix
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys: dict[int, list[tuple[str, Path]]] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"--offload disk streams blocks from safetensors files; {self.folder} has none")
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith(prefix + "."):
                        b, _, name = key[len(prefix) + 1:].partition(".")
                        self.keys.setdefault(int(b), []).append((name, f))
        self.changed: dict[int, tuple[Path, dict]] = {}
        self.version: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self.loads = 0  # blocks materialised so far (for tests and logs)

    # ---- one block --------------------------------------------------------------------------------------------
    def _read_original(self, orig: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name, f in self.keys.get(orig, []):
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for name in names:
                    out[name] = fh.get_tensor(f"{self.prefix}.{orig}.{name}").to(self.dtype)
        if not out:
            raise ValueError(f"no weights of block {orig} in {self.folder}")
        return out

    def load(self, block: nn.Module) -> None:
        """Materialise ``block`` (no-op when it already is)."""
        if is_materialized(block):
            return
        orig = block_origin(block)
        if orig in self.changed:
            path, spec = self.changed[orig]
            rebuild_block(self.adapter, block, spec)
            values = load_file(path)
        else:
            values = self._read_original(orig)
        bad = [k for k, v in values.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"block {orig} has non-finite (NaN/inf) weights in {', '.join(bad[:5])}")
        block.load_state_dict({k: v.to(self.device) for k, v in values.items()}, strict=True, assign=True)
        self.loads += 1

    def release(self, block: nn.Module) -> None:
        """Back to ``meta`` (frees the memory) unless pinned. Changes not saved with :meth:`save` are lost."""
        if self.pins.get(id(block), 0) > 0 or not is_materialized(block):
            return
        block.to("meta")

    def save(self, block: nn.Module) -> None:
        """Persist a changed block (state dict + structure) in the work folder; later loads read it.

        Under torch.distributed every rank calls this at the same point (the ranks change the same blocks in the
        same order) and rank 0 alone writes: the others wait for its file and read their later loads from it, so
        the ranks share one copy on disk and continue from identical weights."""
        orig = block_origin(block)
        v = self.version.get(orig, 0) + 1
        path = self.work / f"b{orig:04d}-v{v:04d}.safetensors"
        if is_main():
            save_tensors_atomic(block.state_dict(), path)
        barrier()  # rank 0's file is complete before any rank reads it or goes on
        old = self.changed.get(orig)
        self.changed[orig] = (path, block_spec(self.adapter, block))
        self.version[orig] = v
        if old is not None and is_main():  # no rank reads the old version after the barrier
            old[0].unlink(missing_ok=True)

    @contextlib.contextmanager
    def resident(self, blocks: Sequence[nn.Module], *, save: Sequence[nn.Module] = ()) -> Iterator[None]:
        """Blocks materialised (and pinned) inside the context; ``save`` ones are persisted on the way out."""
        for b in blocks:
            self.load(b)
            self.pins[id(b)] = self.pins.get(id(b), 0) + 1
        try:
            yield
        finally:
            for b in save:
                self.save(b)
            for b in blocks:
                self.pins[id(b)] -= 1
                if self.pins[id(b)] == 0:
                    del self.pins[id(b)]
                    self.release(b)

    def close(self) -> None:
        if is_main():  # the files are rank 0's (see save)
            for path, _ in self.changed.values():
                path.unlink(missing_ok=True)
        self.changed.clear()
