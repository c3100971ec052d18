import json

import pytest

from fusegpt.benchmark import BenchConfig, bench_models, model_macs
from fusegpt.cli import main
from fusegpt.export import drop_blocks

from conftest import tiny_model


def test_macs_scale_with_blocks():
    dense = tiny_model("llama", 6)
    m = model_macs(dense, 32)
    assert len(m.per_block) == 6 and m.total == pytest.approx(m.blocks + m.lm_head)
    drop_blocks(dense, [1, 2])
    assert model_macs(dense, 32).blocks == pytest.approx(m.blocks * 4 / 6)


def test_bench_models_interleaved_with_speedups():
    dense = tiny_model("llama", 6)
    small = tiny_model("llama", 6)
    drop_blocks(small, [0, 1, 2])
    cfg = BenchConfig(prefill_tokens=32, decode_tokens=4, prompt_tokens=4, decode_batches=(1, 2), repeats=2,
                      memory=False)
    rep = bench_models({"dense": dense, "small": small}, cfg, reference="dense")
    assert [m.name for m in rep.models] == ["dense", "small"]
    assert len(rep.models[0].prefill["seconds"]) == 2 and rep.models[1].decode["b2"]["tokens_per_second"] > 0
    (c,) = rep.comparisons
    assert set(c["speedup_measured"]) == {"prefill", "decode_b1", "decode_b2"}
    ideal = rep.models[0].macs_prefill.total / rep.models[1].macs_prefill.total
    assert c["speedup_ideal"]["prefill"] == pytest.approx(ideal)
    assert c["measured_over_ideal"]["prefill"] == pytest.approx(c["speedup_measured"]["prefill"] / ideal)


def test_bench_cli_json_plot_memory(tiny_folder, tmp_path):
    drop = tmp_path / "drop"
    assert main(["drop", str(tiny_folder), "--blocks", "0,1", "--out", str(drop)]) == 0
    out = tmp_path / "b.json"
    assert main(["bench", str(drop), "--vs", str(tiny_folder), "--prefill-tokens", "16", "--decode-tokens", "3",
                 "--decode-batches", "1,2", "--repeats", "2", "--json", str(out), "--plot",
                 str(tmp_path / "bench.png")]) == 0
    data = json.loads(out.read_text())
    for key in ("speedup_measured", "speedup_ideal", "measured_over_ideal"):
        assert set(data[key]) == {"prefill", "decode_b1", "decode_b2"}
    for m in data["models"]:
        mem = m["memory"]
        assert mem["baseline_rss_bytes"] > 0 and mem["load_peak_rss_bytes"] >= mem["baseline_rss_bytes"]
        if mem["hwm_reset"]:  # Linux: the peak counter was reset after loading
            assert m["peak_rss_bytes"] >= mem["baseline_rss_bytes"] + mem["model_rss_bytes"] - 2**20
    assert (tmp_path / "bench.png").stat().st_size > 0
