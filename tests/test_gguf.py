"""GGUF export: llama.cpp's layout, verified by transformers' GGUF loader, metadata and tokenizer carried over."""

import json

import pytest
import torch

from fusegpt.cli import main


def _logits(folder, gguf_file=None, ids=None):
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def _fields(path):
    import gguf

    from fusegpt.gguf_export import _field_value

    return {k: _field_value(f)[0] for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("qtype,tol", [("f16", 2e-2), ("q8_0", 8e-2), ("q4_0", 0.5)])
def test_exported_checkpoint_round_trips_through_transformers(tiny_folder, tmp_path, qtype, tol):
    from transformers import AutoTokenizer

    out = tmp_path / "dropped"
    assert main(["drop", str(tiny_folder), "--blocks", "1,3", "--out", str(out)]) == 0
    g = tmp_path / "m.gguf"
    assert main(["export", str(out), "--gguf", str(g), "--type", qtype, "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["verification"]["ok"] and summary["blocks"] == 4
    f = _fields(g)
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 4
    assert f["tokenizer.ggml.model"] == "gpt2"
    # independently of the writer's own check: logits of the GGUF vs the safetensors checkpoint
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    a, b = _logits(out, ids=ids), _logits(tmp_path, "m.gguf", ids=ids)
    assert (a - b).abs().max() / a.abs().max() < tol
    if qtype != "q4_0":  # 4-bit rounding flips near-ties of a random tiny model's flat distributions
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # the tokenizer built from tokenizer.json encodes text the same way
    text = "The quick brown fox , 1984 @-@ jumps"
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf").encode(text, add_special_tokens=False) == \
        AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
    if qtype == "q8_0":  # 8-bit blocks: about half the bytes of f16
        f16 = tmp_path / "f16.gguf"
        assert main(["export", str(out), "--gguf", str(f16), "--type", "f16"]) == 0
        assert g.stat().st_size < 0.7 * f16.stat().st_size
    # never overwrites without being asked
    assert main(["export", str(out), "--gguf", str(g), "--type", qtype]) == 2


def test_source_gguf_metadata_is_carried_and_reindexed(tiny_folder, tmp_path):
    """A model that came from a GGUF keeps that file's metadata (tokenizer, names) with block_count renumbered."""
    from fusegpt.gguf_export import write_gguf

    src = tmp_path / "src" / "tiny.gguf"
    write_gguf(tiny_folder, src, qtype="f32")
    assert main(["drop", str(src), "--blocks", "0,5", "--out", str(tmp_path / "d")]) == 0
    assert main(["export", str(tmp_path / "d"), "--gguf", str(tmp_path / "d.gguf"), "--type", "f16"]) == 0
    before, after = _fields(src), _fields(tmp_path / "d.gguf")
    assert before["llama.block_count"] == 6 and after["llama.block_count"] == 4
    assert after["tokenizer.ggml.tokens"] == before["tokenizer.ggml.tokens"]
    assert after["tokenizer.ggml.merges"] == before["tokenizer.ggml.merges"]


def test_refusals(tiny_folder, tmp_path, capsys):
    assert main(["export", str(tiny_folder), "--gguf", str(tmp_path / "x.bin")]) == 2
    assert ".gguf" in capsys.readouterr().err
    assert main(["export", str(tiny_folder), "--gguf", str(tmp_path / "x.gguf"), "--type", "q4_k"]) == 2
    assert not list(tmp_path.glob("*gguf*"))


def test_family_without_a_gguf_layout_is_refused(tmp_path, capsys):
    from conftest import tiny_model

    model = tiny_model("phi3", 2)
    model.save_pretrained(tmp_path / "phi3")
    assert main(["export", str(tmp_path / "phi3"), "--gguf", str(tmp_path / "p.gguf")]) == 2
    assert "GGUF export supports llama, mistral, qwen2, qwen3 models, not 'phi3'" in capsys.readouterr().err
    assert not (tmp_path / "p.gguf").exists()
