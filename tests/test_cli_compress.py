"""End to end through the CLI on a tiny model folder with a small BPE tokenizer trained offline."""

import json
import math

import pytest

from fusegpt.cli import main



def test_compress_cli_writes_checkpoint_report_plots(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compress", str(tiny_folder), "--out", str(out), "--remove", "2", "--nsamples", "8", "--score-samples",
            "4", "--seqlen", "32", "--epochs", "1", "--coef-rank", "4", "--lora-rank", "4", "--group-size", "3",
            "--batch-size", "4", "--compute-dtype", "fp32", "--no-consolidate"]
    assert main(args) == 0
    rep = json.loads((out / "fusegpt_report.json").read_text())
    assert len(rep["removed"]) == 2 and rep["final_layers"] == 4
    step = rep["steps"][0]
    assert set(step["scores"]) == {str(i) for i in range(6)}
    assert len(step["group"]) == 3 and step["loss_before"] is not None and "scoring" in step["seconds"]
    assert (out / "mi.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    meta = json.loads((out / "fusegpt.json").read_text())
    assert meta["removed"] == rep["removed"] and meta["num_hidden_layers"] == 4
    # the exported checkpoint's PPL equals the in-memory fused model's
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())["perplexity"]["ppl"]
    assert math.isclose(exported, rep["evaluation"]["wikitext2"]["ppl"], rel_tol=1e-4)
    # a second run into the same folder is refused without --overwrite, and nothing is lost
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "fusegpt_report.json").exists()


def test_config_file_and_flags(tiny_folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 0\ngroup_size: 2\nnsamples: 4\nscore_samples: 2\nseqlen: 16\ncoef_rank: 2\nlora_rank: 0\n")
    out = tmp_path / "o"
    assert main(["compress", str(tiny_folder), "--out", str(out), "--config", str(cfg), "--remove", "1",
                 "--group-size", "3", "--no-eval", "--compute-dtype", "fp32"]) == 0
    rep = json.loads((out / "fusegpt_report.json").read_text())
    assert rep["config"]["group_size"] == 3 and rep["config"]["epochs"] == 0 and rep["config"]["preset"] == "cpu"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    assert main(["compress", str(tiny_folder), "--out", str(tmp_path / "o2"), "--config", str(bad)]) == 2
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--method", "sleb", "--blocks", "1,2"], "fusegpt drop"),
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--method", "heal-lora", "--heal-from", "heal-lora"], "heal-from"),
    (["--method", "laco", "--laco-layers", "1"], "laco-layers"),
])
def test_bad_method_options_exit_2_before_loading(argv, msg, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", "no-such-model", "--out", str(out), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()
