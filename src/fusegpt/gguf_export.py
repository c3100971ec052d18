"""Write an exported (or dense) checkpoint as a GGUF file that llama.cpp and transformers' GGUF loader read.

Tensor names and metadata follow llama.cpp's layout (``gguf.get_tensor_name_map``; Llama's q/k rows permuted the
way llama.cpp's converter does). ``{arch}.block_count`` is the checkpoint's depth; per-layer metadata arrays of the
source GGUF are reindexed to the kept blocks. Tokenizer metadata is carried from the source GGUF when the model
came from one (SmolLM2 ships as GGUF), otherwise built from a byte-level BPE ``tokenizer.json`` (the ``gpt2``
tokenizer model of GGUF); other tokenizers are refused. Tensor types: ``f32``, ``f16`` or ``q8_0`` (norms and
other 1-D tensors stay f32, as in llama.cpp; a matrix whose rows are not a multiple of 32 stays f16 in q8_0 and
q4_0). ``bf16``, ``q8_0`` and ``q4_0`` use the gguf package's own quantizers (round to nearest, per 32-value block
for the q types: the same files llama.cpp's ``llama-quantize`` writes for these types without an importance matrix).

Nothing is reported written before it is verified: the file is written under a temporary name, loaded back with
transformers (``gguf_file=``), and its logits on a few windows are compared with the checkpoint's; only then is it
renamed into place. The comparison goes into the returned summary.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["GGUF_TYPES", "GGUF_ARCHS", "GGUFExportError", "check_gguf_output", "write_gguf"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_QUANT = {"q8_0": "Q8_0", "q4_0": "Q4_0", "bf16": "BF16"}  # gguf.quants types (round to nearest, llama.cpp's)
# model_type -> (GGUF architecture, permute q/k rows as llama.cpp's LlamaModel converter does)
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
              "qwen3": ("qwen3", False)}
# agreement the written file must show with the checkpoint: max |logit difference| over the logit scale, the share
# of positions whose most likely next token is the same, and for every weight max |difference| over its max |value|
# (f16 rounds to 2^-11 of a value; q8_0 to 1/254 of its 32-value block's largest)
# (bf16 to 2^-8; q4_0 to 1/8 of its block's largest: the clamp at +7 of a value opposite to it)
TOLERANCE = {"f32": (1e-4, 1.0, 1e-6), "f16": (2e-2, 0.97, 1e-3), "bf16": (5e-2, 0.95, 5e-3),
             "q8_0": (8e-2, 0.9, 1e-2), "q4_0": (0.5, 0.6, 0.13)}


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as GGUF (unsupported family or tokenizer) or did not verify."""


def check_gguf_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is not a ``.gguf`` name, or that exists without ``overwrite`` (before any loading)."""
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--gguf {out}: the file name must end in .gguf")
    if out.exists() and not overwrite:
        from .export import OutputExistsError

        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of transformers' ``_reverse_permute_weights``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field) -> tuple[Any, Any, Any]:
    """(value, value type, sub type) of a GGUFReader field, in the form GGUFWriter.add_key_value takes."""
    import gguf

    vt = field.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        return vals, vt, sub
    if vt == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="surrogateescape"), vt, None
    return field.parts[field.data[0]].tolist()[0], vt, None


def _copy_metadata(writer, source: Path, arch: str, kept: Sequence[int] | None, blocks: int) -> None:
    """Every key of the source GGUF but the ones the writer sets itself; per-layer arrays reindexed to ``kept``
    (the source's original indices of the checkpoint's ``blocks`` blocks; None = all of them)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    old_blocks = int(_field_value(reader.fields[f"{arch}.block_count"])[0])
    kept = list(range(old_blocks)) if kept is None else list(kept)
    if len(kept) != blocks:
        raise GGUFExportError(f"{len(kept)} kept blocks given for a checkpoint of {blocks}")
    skip = {"general.architecture", "general.file_type", f"{arch}.block_count", "general.quantization_version"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        val, vt, sub = _field_value(field)
        if key.startswith(arch + ".") and isinstance(val, list) and len(val) == old_blocks:
            val = [val[i] for i in kept]
        writer.add_key_value(key, val, vt, sub_type=sub)


def _hf_metadata(writer, config, tokenizer_folder: Path) -> None:
    """Hyper-parameters from the HF config, tokenizer from a byte-level BPE tokenizer.json."""
    import gguf

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_feed_forward_length(int(text.intermediate_size))
    writer.add_head_count(int(text.num_attention_heads))
    writer.add_head_count_kv(int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * text.num_attention_heads != text.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    rope = getattr(text, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None)) if isinstance(rope, dict) else None
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(int(text.vocab_size))

    path = tokenizer_folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{tokenizer_folder} has no tokenizer.json; GGUF export builds the tokenizer from a "
                              "byte-level BPE tokenizer.json or carries it from a source GGUF")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    pre = json.dumps(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise GGUFExportError(f"{path}: tokenizer model {model.get('type')!r} is not a byte-level BPE; GGUF export "
                              "builds only that kind (llama.cpp's 'gpt2' tokenizer) or carries a source GGUF's")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, int(t["id"]))
    size = max(int(text.vocab_size), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        special = tok in added and added[tok].get("special", False)
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gguf.SpecialVocab(tokenizer_folder, load_merges=False, n_vocab=size).add_to_gguf(writer, quiet=True)


def _verification_windows(folder: Path, vocab: int, n: int = 4, t: int = 64) -> torch.Tensor:
    """``n`` windows of ``t`` tokens of the shipped WikiText-2 validation text (real text: on random ids the
    next-token distributions are flat and their top-1 a near-tie), random ids when the tokenizer cannot load."""
    from transformers import AutoTokenizer

    from .data import load_text, sample_windows, tokenize_text

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = tokenize_text(tok, load_text("wikitext2-valid")[:200_000])
        if int(ids.max()) < vocab and ids.numel() > n * t:
            return sample_windows(ids, n, t, torch.Generator().manual_seed(0))
    except (OSError, ValueError):
        pass
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _verify(ref, gguf_path: Path, qtype: str, windows: torch.Tensor) -> dict[str, Any]:
    """Load the GGUF with transformers and compare its logits and weights with those of ``ref`` (the checkpoint)."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                               local_files_only=True).eval()
    with torch.no_grad():
        a = ref(input_ids=windows).logits.float()
        b = got(input_ids=windows).logits.float()
    scale = a.abs().max().item() or 1.0
    diff = (a - b).abs().max().item() / scale
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # weight by weight (logits of a small random model barely depend on q/k: a wrong row order would pass them)
    want, have = ref.state_dict(), got.state_dict()
    missing = sorted(set(want) - set(have))
    worst, worst_name = 0.0, None
    for name, w in want.items():
        if name not in have:
            continue
        err = ((w - have[name].float()).abs().max() / (w.abs().max() or 1.0)).item()
        if err > worst:
            worst, worst_name = err, name
    max_diff, min_top1, max_weight = TOLERANCE[qtype]
    ok = diff <= max_diff and top1 >= min_top1 and worst <= max_weight and not missing
    return {"max_logit_diff_over_scale": diff, "top1_agreement": top1, "max_weight_diff_over_scale": worst,
            "worst_weight": worst_name, "missing_weights": missing,
            "tolerance": {"max_diff": max_diff, "min_top1": min_top1, "max_weight_diff": max_weight}, "ok": ok,
            "windows": list(windows.shape)}


def write_gguf(
    folder: str | os.PathLike, out: str | os.PathLike, *, qtype: str = "f16", source_gguf: str | os.PathLike | None
    = None, kept: Sequence[int] | None = None, overwrite: bool = False, verify_windows: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write checkpoint ``folder`` as GGUF file ``out`` (verified, atomic). ``source_gguf``: the GGUF the model was
    converted from (metadata and tokenizer are carried; ``kept`` = the original indices of the blocks the
    checkpoint keeps, to reindex per-layer arrays). Returns a summary (type, bytes, tensors, verification)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, out = Path(folder), Path(out)
    if qtype not in GGUF_TYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    check_gguf_output(out, overwrite)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in GGUF_ARCHS:
        raise GGUFExportError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHS))} models, not "
                              f"{config.model_type!r}")
    arch, permute = GGUF_ARCHS[config.model_type]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    L = int(config.num_hidden_layers)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, L)
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or
                                                     config.num_attention_heads)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_block_count(L)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            _copy_metadata(writer, Path(source_gguf), arch, kept, L)
        else:
            _hf_metadata(writer, config, folder)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        n_tensors = 0
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            base, _, suffix = hf_name.rpartition(".")
            gname = names.get_name(base)
            if gname is None:
                raise GGUFExportError(f"no GGUF name for tensor {hf_name} ({arch})")
            data = t.detach().float().numpy()
            if permute and gname.endswith(("attn_q", "attn_k")) and suffix == "weight":
                data = _permute(data, heads, heads if gname.endswith("attn_q") else kv)
            name = f"{gname}.{suffix}"
            if data.ndim < 2 or qtype == "f32":
                writer.add_tensor(name, data.astype(np.float32))
            elif qtype in _QUANT and (qtype == "bf16" or data.shape[-1] % 32 == 0):
                kind = getattr(gguf.GGMLQuantizationType, _QUANT[qtype])
                q = gguf.quants.quantize(data, kind)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
            else:
                writer.add_tensor(name, data.astype(np.float16))
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)  # a tqdm bar per tensor: minutes on 7B+ models
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if verify_windows is None:
            verify_windows = _verification_windows(folder, int(config.vocab_size))
        # transformers reads a GGUF from a folder + file name; verify under the temporary name
        check = _verify(model, tmp, qtype, verify_windows)
        if not check["ok"]:
            raise GGUFExportError(f"the written GGUF does not reproduce the checkpoint: {check}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary = {"gguf": str(out), "type": qtype, "bytes": out.stat().st_size, "tensors": n_tensors, "blocks": L,
               "architecture": arch, "metadata_from": str(source_gguf) if source_gguf else "hf config + tokenizer",
               "verification": check}
    log.info("wrote %s (%s, %.1f MiB): logits within %.2g of the checkpoint's, top-1 agreement %.3f", out, qtype,
             summary["bytes"] / 2**20, check["max_logit_diff_over_scale"], check["top1_agreement"])
    return summary
