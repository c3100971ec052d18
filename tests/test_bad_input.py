"""Bad input is refused before the model is loaded or any compute starts: exit code 2, a message naming the fix,
nothing written. Each test backs one row of the bad-input table in docs/PROTOCOL.md."""

import shutil
import sys

import numpy as np
import pytest
import torch

import fusegpt.models
from fusegpt.cli import main

BASE = ["--nsamples", "8", "--score-samples", "4", "--seqlen", "32", "--epochs", "1", "--coef-rank", "4",
        "--lora-rank", "4", "--group-size", "3", "--batch-size", "4", "--compute-dtype", "fp32", "--no-eval"]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(fusegpt.models, "load_model", refuse)


def _refused(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def _compress(model, out, *extra):
    return ["compress", str(model), "--out", str(out), *BASE, *extra]


def test_unwritable_output_folder(tiny_folder, capsys, no_load):
    _refused(_compress(tiny_folder, "/proc/nope", "--remove", "1"), capsys, "cannot be written", "--out")


def test_output_under_a_file(tiny_folder, tmp_path, capsys, no_load):
    (tmp_path / "f").write_text("x")
    _refused(_compress(tiny_folder, tmp_path / "f" / "out", "--remove", "1"), capsys, "is not a folder")
    assert (tmp_path / "f").read_text() == "x"


def test_non_empty_output_without_overwrite(tiny_folder, tmp_path, capsys, no_load):
    (tmp_path / "keep.txt").write_text("mine")
    _refused(_compress(tiny_folder, tmp_path, "--remove", "1"), capsys, "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_seqlen_beyond_the_models_context(tiny_folder, tmp_path, capsys, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "1", "--seqlen", "100000"), capsys,
             "maximum context of 256", "--seqlen 256 or less")
    _refused(["eval", str(tiny_folder), "--seqlen", "100000"], capsys, "maximum context of 256")
    assert not (tmp_path / "o").exists()


def test_more_calibration_windows_than_the_text_holds(tiny_folder, tmp_path, capsys, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "1", "--nsamples", "100000"), capsys,
             "--nsamples 100000", "without overlap", "--calib FILE")
    assert not (tmp_path / "o").exists()
    # the preset's final stage draws windows of its own (2 x --nsamples): the message says so and how to lower it
    from transformers import AutoTokenizer

    from fusegpt.data import load_text, tokenize_text

    tokens = tokenize_text(AutoTokenizer.from_pretrained(tiny_folder), load_text("wikitext2-valid")).numel()
    n = tokens // 32 * 2 // 3  # fits alone, not twice
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "1", "--nsamples", str(n), "--final-epochs", "1",
                       "--final-nsamples", str(2 * n)), capsys,
             f"--nsamples {n} + {n} more for the final stage", f"--final-nsamples {2 * n}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "two"]])
def test_threads_must_be_positive(tiny_folder, tmp_path, capsys, argv, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "1", *argv), capsys, "--threads")
    assert not (tmp_path / "o").exists()


def test_zero_shot_without_the_eval_extra(tiny_folder, monkeypatch, capsys, no_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    _refused(["eval", str(tiny_folder), "--tasks", "piqa"], capsys, "pip install 'fusegpt[eval]'")


def test_help_lists_accepted_values(capsys):
    assert main(["compress", "--help"]) == 0
    out = capsys.readouterr().out
    from fusegpt.distill import LOSSES

    losses = "{" + ",".join(LOSSES) + "}"
    assert {"kl-batch", "kl-hidden", "mse", "cosine", "nmse", "mse-norm", "logit-kl"} <= set(LOSSES)
    from fusegpt.scoring import ORDERS

    orders = "{" + ",".join(ORDERS) + "}"
    assert {"mi", "bi", "nll", "fisher"} <= set(ORDERS)
    for choice in (losses, "{iterative,oneshot,joint}", "{coef,coef+lora,full}", orders, "{current,dense}",
                   "{scalar,vector,matrix,lowrank}", "{auto,fp32,bf16,fp16}", "{fp32,bf16,fp16,auto}", "fusegpt-global",
                   "{cpu,paper}"):
        assert choice in out


def test_unknown_choice_is_refused(tiny_folder, tmp_path, capsys, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--loss", "l1"), capsys, "invalid choice: 'l1'")


def test_sparsity_leaving_no_block(tiny_folder, tmp_path, capsys, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "6"), capsys, "every block")
    _refused(_compress(tiny_folder, tmp_path / "o", "--sparsity", "1.0"), capsys, "(0, 1)")
    _refused(["drop", str(tiny_folder), "--blocks", "0,1,2,3,4,5", "--out", str(tmp_path / "o")], capsys,
             "keep at least one block")
    _refused(["drop", str(tiny_folder), "--blocks", "9", "--out", str(tmp_path / "o")], capsys, "0..5")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,msg", [(["--cache-entries", "2"], "--cache-entries must be 0"),
                                      (["--diverge-factor", "0.5"], "--diverge-factor must be 0"),
                                      (["--offload", "ram"], "invalid choice: 'ram'")])
def test_memory_and_divergence_options(tiny_folder, tmp_path, capsys, argv, msg, no_load):
    _refused(_compress(tiny_folder, tmp_path / "o", "--remove", "1", *argv), capsys, msg)
    assert not (tmp_path / "o").exists()


def test_unknown_config_keys(tiny_folder, tmp_path, capsys, no_load):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    _refused(_compress(tiny_folder, tmp_path / "o", "--config", str(bad)), capsys, "unknown config keys ['epoch']")
    assert not (tmp_path / "o").exists()


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_damaged_safetensors(tiny_folder, tmp_path, capsys, damage, no_load):
    model = _copy(tiny_folder, tmp_path)
    f = model / "model.safetensors"
    if damage == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    else:
        with open(f, "r+b") as fh:
            fh.write(b"\xff" * 8)
    _refused(_compress(model, tmp_path / "o", "--remove", "1"), capsys, "truncated or corrupt", "model.safetensors")
    _refused(["eval", str(model)], capsys, "truncated or corrupt")
    assert not (tmp_path / "o").exists()


def test_truncated_gguf(tmp_path, capsys, monkeypatch, no_load):
    import gguf

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf.GGUFReader(str(path))  # the whole file reads
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4096)
    _refused(_compress(path, tmp_path / "o", "--remove", "1"), capsys, "truncated or corrupt", "m.gguf")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_non_finite_weights(tiny_folder, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_folder, tmp_path)
    f = model / "model.safetensors"
    tensors = load_file(f)
    name = next(n for n in tensors if "layers.2.mlp.up_proj" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    import fusegpt.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: calls.append(1))  # no compute may start
    _refused(_compress(model, tmp_path / "o", "--remove", "1"), capsys, "non-finite", name)
    assert not calls and not (tmp_path / "o").exists()


def test_bad_auto_dtype_switch(tiny_folder, tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.setenv("FUSEGPT_AUTO_DTYPE", "fp8")
    _refused(["compress", str(tiny_folder), "--out", str(tmp_path / "o"), "--remove", "1", "--no-eval"], capsys,
             "FUSEGPT_AUTO_DTYPE='fp8'")


def test_unknown_model(tmp_path, capsys):
    _refused(_compress("no-such-model", tmp_path / "o", "--remove", "1"), capsys, "accepted are")
    assert not (tmp_path / "o").exists()


def test_nothing_is_written_by_a_refusal(tiny_folder, tmp_path, capsys, no_load):
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(_compress(tiny_folder, tmp_path / "a" / "b", "--remove", "1", "--seqlen", "4096"), capsys, "--seqlen")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert torch.get_num_threads() >= 1
