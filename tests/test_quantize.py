"""Weight quantization through llm-compressor (GPTQ) of a compressed checkpoint.

llm-compressor pins transformers<=5.17, so the quantizing tests run in the quantization environment
(`make setup-quant`; `.ci/run` runs this file there too); the main environment checks the clear error and that
a quantized folder, once written, loads and evaluates there."""

import json
import shutil

import pytest
import torch

from fusegpt.cli import main


def _has_llmcompressor() -> bool:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return False
    return True


needs_llmc = pytest.mark.skipif(not _has_llmcompressor(), reason="llm-compressor: the quantization environment "
                                "(make setup-quant) runs these")


@pytest.mark.skipif(_has_llmcompressor(), reason="llm-compressor is installed here")
def test_quantize_without_llmcompressor_says_how_to_install(tiny_folder, tmp_path, capsys):
    assert main(["quantize", str(tiny_folder), "--scheme", "gptq-w4a16", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "make setup-quant" in err and "fusegpt[quant]" in err
    assert not (tmp_path / "q").exists()


def test_unknown_scheme_is_refused(tiny_folder, tmp_path, capsys):
    assert main(["quantize", str(tiny_folder), "--scheme", "int3", "--out", str(tmp_path / "q")]) == 2
    assert "gptq-w4a16" in capsys.readouterr().err


@needs_llmc
@pytest.mark.parametrize("scheme,bits", [("gptq-w4a16", 4), ("gptq-w8a16", 8)])
def test_gptq_of_a_dropped_model_reloads_and_evaluates(tiny_folder, tmp_path, scheme, bits):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fusegpt.quantize import checkpoint_bytes

    dropped = tmp_path / "dropped"
    assert main(["drop", str(tiny_folder), "--blocks", "1,3", "--out", str(dropped)]) == 0
    out = tmp_path / "q"
    args = ["quantize", str(dropped), "--scheme", scheme, "--out", str(out), "--nsamples", "16", "--seqlen", "64",
            "--dtype", "fp32", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verification"]["ok"] and rep["verification"]["reload_max_logit_diff_over_scale"] <= 1e-5
    assert json.loads((out / "quantize_report.json").read_text())["scheme"] == scheme
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    # the linears are stored as packed integers with scales, the head is not quantized
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.up_proj.weight_packed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
        assert "lm_head.weight" in keys
    assert checkpoint_bytes(out) < checkpoint_bytes(dropped)
    # where the block structure came from is kept (GGUF export / eval of the quantized model read it)
    meta = json.loads((out / "fusegpt.json").read_text())
    assert meta["kept"] == [0, 2, 4, 5] and meta["quantization"]["scheme"] == scheme
    # quantization changed the weights, within what `bits` allows: the logits move, the top-1 mostly agrees
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    a = AutoModelForCausalLM.from_pretrained(dropped, dtype=torch.float32).eval()(input_ids=ids).logits
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert 0 < rel < (0.5 if bits == 4 else 0.05)
    # fusegpt eval reads the quantized folder
    assert main(["eval", str(out), "--seqlen", "64", "--max-windows", "4", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["layers"] == 4
    # never over a non-empty folder without being asked; with --overwrite, replaced
    assert main(args) == 2
    shutil.rmtree(tmp_path / "q")


@needs_llmc
def test_compare_adds_quantized_companion_rows_and_resumes_them(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    base = ["compare", str(tiny_folder), "--sparsity", "0.34", "--methods", "drop-mi", "--nsamples", "16",
            "--seqlen", "64", "--group-size", "2", "--eval-seqlen", "64", "--eval-windows", "4",
            "--out", str(out)]
    assert main(base) == 0
    first = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in first["rows"]} == {"dense", "drop-mi"}
    # the same folder resumed with --quantize: only the companions are computed, the old rows stay as they were
    assert main([*base, "--resume", "--quantize", "gptq-w8a16"]) == 0
    rows = {(r["method"], r["sparsity"]): r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {("dense", 0.0), ("drop-mi", 0.34), ("dense+gptq-w8a16", 0.0), ("drop-mi+gptq-w8a16", 0.34)}
    q, d = rows[("drop-mi+gptq-w8a16", 0.34)], rows[("drop-mi", 0.34)]
    assert q["removed"] == d["removed"] and q["layers"] == d["layers"] and q["kind"] == "drop+quant"
    assert q["ppl"] != d["ppl"] and abs(q["ppl"] - d["ppl"]) / d["ppl"] < 0.2  # 8-bit: close, not equal
    assert q["extra"]["weight_bits"] == 8 and q["extra"]["quantize_seconds"] > 0
    assert rows[("dense", 0.0)]["ppl"] == next(r["ppl"] for r in first["rows"] if r["method"] == "dense")
    assert "drop-mi+gptq-w8a16" in (out / "compare.md").read_text()


@needs_llmc
def test_more_calibration_than_the_text_holds_is_refused_before_loading(tiny_folder, tmp_path, capsys, monkeypatch):
    import fusegpt.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fusegpt.models, "load_model", no_load)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--scheme", "gptq-w8a16", "--out", str(out), "--nsamples", "100000",
                 "--seqlen", "256"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert not out.exists()
