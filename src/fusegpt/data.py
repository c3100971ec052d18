"""Named text sources and seeded calibration sampling.

Sources (see ``_data/DATA_LICENSES.md`` for provenance):

- ``wikitext2``: WikiText-2 raw test rows, CRLF -> LF, joined with "\\n\\n" (the evaluation text).
- ``wikitext2-valid``: WikiText-2 (tokenized) validation file's lines joined with "\\n\\n" (default calibration).
- ``wikitext103-valid``: WikiText-103 (tokenized) validation, records of a CSV export joined with "\\n\\n".
- ``lambada-dev``: LAMBADA development passages (one per line) joined with "\\n\\n".
- ``lambada-test``: LAMBADA (OpenAI detokenized) test passages joined with "\\n\\n" (a second evaluation text:
  fiction, where WikiText is encyclopedic).
- ``boolq-passages``: the BoolQ dev set's Wikipedia passages (raw text: no ``<unk>``, no ``@-@`` splits),
  deduplicated in file order, joined with "\\n\\n" (raw-text calibration; do not use it when evaluating BoolQ).
- any local ``.txt`` file (used as is) or ``.jsonl`` file (the ``text`` field of every record, joined with "\\n\\n").
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "register_source",
    "sample_starts",
    "heldout_starts",
    "source_names",
    "load_text",
    "tokenize_text",
    "sample_windows",
    "split_windows",
    "check_window_count",
    "DataSourceError",
]

_SOURCES: dict[str, tuple[Callable[[], str], str]] = {}


class DataSourceError(ValueError):
    """Unknown source name, missing file or unreadable content."""


def register_source(name: str, description: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def deco(fn: Callable[[], str]) -> Callable[[], str]:
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} registered twice")
        _SOURCES[name] = (fn, description)
        return fn

    return deco


def source_names() -> dict[str, str]:
    """Registered source names -> one-line descriptions."""
    return {k: d for k, (_, d) in sorted(_SOURCES.items())}


def _packaged(name: str) -> str:
    return resources.files("fusegpt").joinpath("_data", name).read_text(encoding="utf-8")


def _join_lines(lines) -> str:
    return "\n\n".join(lines)


@register_source("wikitext2", "WikiText-2 raw test rows joined with blank lines (evaluation text)")
def _wikitext2_test() -> str:
    raw = _packaged("wikitext2-test.nonblank-crlf.raw").replace("\r\n", "\n")
    return _join_lines(line for line in raw.split("\n") if line)


@register_source("wikitext2-valid",
                 "WikiText-2 tokenized validation lines joined with blank lines (default calibration)")
def _wikitext2_valid() -> str:
    return _join_lines(_packaged("wikitext2-valid.tokens.txt").split("\n"))


@register_source("wikitext103-valid", "WikiText-103 tokenized validation (CSV export) records joined with blank lines")
def _wikitext103_valid() -> str:
    records = [row[0] if row else "" for row in csv.reader(io.StringIO(_packaged("wikitext103-valid.csv-export.txt")))]
    return _join_lines(r for r in records if r.strip())


@register_source("lambada-dev", "LAMBADA development passages (BookCorpus) joined with blank lines")
def _lambada_dev() -> str:
    return _join_lines(line for line in _packaged("lambada-dev.plain.txt").split("\n") if line.strip())


def _jsonl_field(name: str, key: str) -> list[str]:
    return [json.loads(line)[key] for line in _packaged(name).split("\n") if line.strip()]


@register_source("lambada-test", "LAMBADA (OpenAI) test passages joined with blank lines (second evaluation text)")
def _lambada_test() -> str:
    return _join_lines(_jsonl_field("tasks/lambada/lambada_test.jsonl", "text"))


@register_source("boolq-passages",
                 "BoolQ dev Wikipedia passages, raw text, deduplicated, joined with blank lines (raw calibration)")
def _boolq_passages() -> str:
    return _join_lines(dict.fromkeys(_jsonl_field("tasks/boolq/val.jsonl", "passage")))


def _local_file(path: Path) -> str:
    if not path.is_file():
        raise DataSourceError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataSourceError(f"{path}:{lineno}: every JSONL record needs a string field 'text'")
                texts.append(rec["text"])
        return _join_lines(texts)
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    raise DataSourceError(f"data file {str(path)!r}: only .txt and .jsonl files are accepted")


def load_text(source: str) -> str:
    """The text of a named source or a local .txt/.jsonl path."""
    if source in _SOURCES:
        return _SOURCES[source][0]()
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        return _local_file(path)
    raise DataSourceError(
        f"unknown data source {source!r}; use one of {', '.join(source_names())} or a path to a .txt or .jsonl file"
    )


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once: [N] int64 ids (the tokenizer's default special tokens)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_window_count(num_tokens: int, n: int, seqlen: int, source: str = "the calibration text",
                       asked: str | None = None) -> None:
    """Refuse asking for more windows than the text holds without overlap (``n * seqlen > num_tokens``): the
    windows would repeat the same text many times over, which is not the calibration budget asked for. ``asked``
    says where the ``n`` windows come from (default ``--nsamples n``)."""
    if num_tokens <= seqlen:
        raise DataSourceError(f"{source} has {num_tokens} tokens, fewer than one window of --seqlen {seqlen}")
    if n * seqlen > num_tokens:
        asked = f"--nsamples {n}" if asked is None else f"{asked} = {n} windows"
        raise DataSourceError(
            f"{asked} x --seqlen {seqlen} = {n * seqlen:,} tokens, but {source} holds {num_tokens:,} tokens "
            f"(at most {num_tokens // seqlen} windows of {seqlen} without overlap); lower --nsamples or --seqlen, "
            "or bring a larger calibration text with --calib FILE (.txt or .jsonl)"
        )


def sample_starts(num_tokens: int, n: int, seqlen: int, generator: torch.Generator) -> list[int]:
    """Start offsets of N random windows of ``seqlen`` tokens in a stream of ``num_tokens`` (may overlap)."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 and seqlen >= 2 (got n={n}, seqlen={seqlen})")
    check_window_count(num_tokens, n, seqlen)
    return torch.randint(0, num_tokens - seqlen, (n,), generator=generator).tolist()


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """N random windows of ``seqlen`` tokens from a 1-D id stream -> [n, seqlen]. Same seed -> same windows.

    Windows start at random offsets (two may overlap); asking for more tokens than the stream holds is refused
    (:func:`check_window_count`)."""
    if ids.dim() != 1:
        raise ValueError("ids must be 1-D")
    return torch.stack([ids[s : s + seqlen] for s in sample_starts(ids.numel(), n, seqlen, generator)])


def heldout_starts(num_tokens: int, n: int, seqlen: int, generator: torch.Generator,
                   taken: list[int]) -> list[int]:
    """Start offsets of N windows of ``seqlen`` tokens that share no token with each other nor with the windows
    starting at ``taken``: held-out text for a search's fitness (it never scores on what distillation trains on).
    Refused (DataSourceError) when the stream has no room for them."""
    free = torch.ones(num_tokens, dtype=torch.bool)
    for s in taken:
        free[s : s + seqlen] = False

    def no_room(room: int) -> DataSourceError:
        return DataSourceError(f"the calibration text has room for only {room} held-out windows of {seqlen} tokens "
                               f"next to the {len(taken)} calibration windows (asked for {n}); lower the number of "
                               "fitness windows (--search-fitness-samples) or --nsamples, or use a longer --calib")

    room = _room(free, seqlen)
    if n > room:  # refused before the random draws, which would take minutes for a large n
        raise no_room(room)
    out: list[int] = []
    limit = num_tokens - seqlen
    for _ in range(100 * n):
        if len(out) == n or limit <= 0:
            break
        s = int(torch.randint(0, limit, (1,), generator=generator))
        if bool(free[s : s + seqlen].all()):
            out.append(s)
            free[s : s + seqlen] = False
    if len(out) < n:
        raise no_room(len(out))
    return out


def _room(free: torch.Tensor, seqlen: int) -> int:
    """The most non-overlapping windows of ``seqlen`` tokens that fit in the runs of True of ``free``."""
    edges = torch.diff(torch.cat([torch.zeros(1), free.float(), torch.zeros(1)]))
    runs = (edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()
    return int((runs // seqlen).sum())


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping consecutive windows -> [W, seqlen] (the tail shorter than a window is dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise DataSourceError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
