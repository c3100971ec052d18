"""Resumable runs: a settings fingerprint, append-only records, atomic writes.

One mechanism for every long job that must survive a crash (``fusegpt compress --resume``, ``fusegpt compare
--resume``): a run folder holds ``settings.json`` (what the run was started with) and ``records.jsonl`` (one JSON
line per finished unit of work, fsync'ed). Resuming with other settings is refused, naming every key that differs;
a record cut short by a crash (the last line) is ignored, so the unit it described is simply done again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .report import atomic_write_bytes, to_jsonable

log = logging.getLogger(__name__)

__all__ = [
    "RunMismatchError", "atomic_write_bytes", "atomic_write_json", "RecordLog", "settings_diff",
    "check_settings", "file_fingerprint",
]


class RunMismatchError(ValueError):
    """A run folder was started with other settings than the ones given to resume it."""


def file_fingerprint(paths: Iterable[Path]) -> str:
    """A cheap identity of files too large to hash: name, size and modification time of each, plus the full
    content of small ones (<= 1 MiB: configs, tokenizers)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if st.st_size <= 1 << 20:
            h.update(p.read_bytes())
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())


class RecordLog:
    """Append-only JSON lines, each fsync'ed before :meth:`append` returns."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: Any) -> None:
        line = json.dumps(to_jsonable(record), separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        """Every complete record; a damaged line (a write cut short) and anything after it is ignored."""
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s:%d: ignoring a damaged record (an interrupted write) and what follows",
                                self.path, n)
                    break
        return out


def settings_diff(old: dict, new: dict, keys: Iterable[str] | None = None) -> list[str]:
    """Keys whose values differ (nested dicts compared key by key, as ``config.lr``)."""
    out = []
    names = sorted(set(old) | set(new)) if keys is None else list(keys)
    for k in names:
        a, b = to_jsonable(old.get(k)), to_jsonable(new.get(k))
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in settings_diff(a, b)]
        elif a != b:
            out.append(k)
    return out


def check_settings(path: str | os.PathLike, settings: dict, *, what: str = "run",
                   keys: Iterable[str] | None = None) -> None:
    """Refuse to resume when ``path`` (settings.json of a run folder) differs from ``settings``."""
    old = json.loads(Path(path).read_text(encoding="utf-8"))
    diff = settings_diff(old, to_jsonable(settings), keys)
    if diff:
        raise RunMismatchError(
            f"--resume: this {what} was started with different {', '.join(diff)}; resume with the same settings, "
            "or start again in another --out (or with --overwrite)"
        )
