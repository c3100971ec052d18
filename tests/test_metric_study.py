"""benchmarks/metric_study.py runs end to end on a tiny model (so the study script cannot rot)."""

import importlib.util
import json
from pathlib import Path


def test_metric_study_measures_every_block_and_prints_correlations(tiny_folder, tmp_path, capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "metric_study.py"
    spec = importlib.util.spec_from_file_location("metric_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.jsonl"
    argv = ["--model", str(tiny_folder), "--out", str(out), "--threads", "1", "--heldout", "2", "--eval-windows",
            "2", "--fuse-samples", "2", "--fuse-epochs", "1", "--seqlen", "32", "--group-size", "3"]
    mod.main(argv)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    blocks = [r for r in rows if "block" in r]
    assert [r["block"] for r in blocks] == list(range(6)) and sum("metrics" in r for r in rows) == 1
    for r in blocks:
        assert r["drop_ppl"] > 0 and r["fuse_ppl"] > 0 and r["drop_kl"] >= 0 and r["fuse_kl"] >= 0
        assert r["train_steps"] == 1
    text = capsys.readouterr().out
    assert "Macro Influence" in text and "Spearman" in text and text.count("| Fisher | ") == 2  # a column, a row
    mod.main(argv)  # resumed: nothing measured again
    assert len(out.read_text().splitlines()) == len(rows)
