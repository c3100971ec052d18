"""benchmarks/gpu.sh cannot rot: its --tiny mode runs the same script on the CPU at toy shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_tiny_mode_runs_and_projects(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", str(tmp_path)], check=True, env=env,
                   timeout=600)
    res = json.loads((tmp_path / "results.json").read_text())
    a = res["a_paper_step_8b"]
    assert a["removals_for_25pct"] == 1 and a["measured_step_seconds"] > 0
    # the projection scales the measured phases to the preset's budget (N windows, epochs)
    n, e = a["full_config"]["nsamples"] / a["run_config"]["nsamples"], a["full_config"]["epochs"]
    assert a["projected_step_phases_full_budget"]["train"] == \
        a["measured_phases"]["train"] * n * e / a["run_config"]["epochs"]
    assert a["projected_gpu_hours"]["iterative"] >= a["projected_gpu_hours"]["oneshot"] > 0
    assert a["plan_for_the_measured_step"]["seconds"] > 0
    for dtype in ("fp32", "bf16"):
        b = res["b_bench_25pct"][dtype]
        assert b["speedup_ideal"]["prefill"] > 1 and len(b["models"]) == 2
    d = res["d_streamed_compress"]  # the streamed run (blocks loaded onto the device) equals the in-memory one
    assert all(r["rc"] == 0 for r in d["runs"].values()), d
    assert d["same_blocks"] and d["ppl_relative_difference"] < 1e-5
    assert (tmp_path / "gpu.log").stat().st_size > 0
