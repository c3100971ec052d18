"""Runs survive a crash: a compress run killed with SIGKILL during step 2 of 3 and resumed exports exactly the
weights of an uninterrupted run, and its report equals that run's apart from timings."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fusegpt.cli import main

SMALL = ["--remove", "3", "--nsamples", "8", "--score-samples", "4", "--seqlen", "32", "--epochs", "2",
         "--coef-rank", "4", "--lora-rank", "4", "--group-size", "3", "--batch-size", "4", "--compute-dtype", "fp32",
         "--no-eval"]
# what legitimately differs between a resumed and an uninterrupted run: time, memory, measured peaks, versions,
# and the FLOP counters (a resumed run recomputes its activation caches once)
TIMING = {"plan", "seconds", "matmul_peak_flops", "flops_fraction_of_peak", "peak_memory_bytes", "flops", "evaluation",
          "resumed_after_step", "versions", "memory"}


def _report(out):
    rep = json.loads((out / "fusegpt_report.json").read_text())
    for s in rep["steps"]:
        s.pop("seconds")
    return {k: v for k, v in rep.items() if k not in TIMING}


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):  # one file, or one shard per block with --offload disk
        out.update(load_file(f))
    return out


def _killed_run(model, out, args, threads):
    env = {**os.environ, "FUSEGPT_FAULT": "train:1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "fusegpt.cli", "compress", str(model), "--out", str(out), *args,
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc


@pytest.mark.parametrize("mode", [["--mode", "iterative", "--no-consolidate"], ["--mode", "oneshot", "--consolidate"],
                                  ["--mode", "iterative", "--offload", "disk"],
                                  ["--mode", "iterative", "--target", "dense", "--fold-norms"],
                                  ["--mode", "joint", "--blocks", "0,3,5", "--group-size", "1", "--target", "dense"],
                                  ["--mode", "oneshot", "--final-epochs", "1", "--final-nsamples", "12"]],
                         ids=["iterative-fused-state", "oneshot-consolidated", "iterative-disk-offload",
                              "iterative-dense-target", "joint-spans", "final-stage-own-windows"])
def test_sigkill_during_step_2_then_resume_equals_uninterrupted(tiny_folder, tmp_path, mode):
    threads = torch.get_num_threads()  # the same arithmetic in the subprocess and here
    args = [*SMALL, *mode]
    killed = tmp_path / "killed"
    proc = _killed_run(tiny_folder, killed, args, threads)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = killed / ".fusegpt-run"
    records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0]  # step 1 finished and persisted, step 2 died mid-way
    assert not list(killed.glob("*.safetensors"))

    assert main(["compress", str(tiny_folder), "--out", str(killed), *args, "--threads", str(threads),
                 "--resume"]) == 0
    assert not run.exists()  # the export replaced the run folder
    full = tmp_path / "full"
    assert main(["compress", str(tiny_folder), "--out", str(full), *args, "--threads", str(threads)]) == 0

    a, b = _weights(killed), _weights(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _report(killed), _report(full)
    assert ra == rb
    assert json.loads((killed / "fusegpt_report.json").read_text())["resumed_after_step"] == 1


def test_resume_refuses_other_settings_and_missing_runs(tiny_folder, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "o"
    proc = _killed_run(tiny_folder, out, [*SMALL, "--mode", "oneshot"], threads)
    assert proc.returncode == -signal.SIGKILL
    steps = (out / ".fusegpt-run" / "steps.jsonl").read_text()
    # another learning rate: refused, naming it, and the run folder is untouched
    assert main(["compress", str(tiny_folder), "--out", str(out), *SMALL, "--mode", "oneshot", "--coef-lr", "0.5",
                 "--resume"]) == 2
    assert "config.coef_lr" in capsys.readouterr().err
    assert (out / ".fusegpt-run" / "steps.jsonl").read_text() == steps
    # nothing to resume
    assert main(["compress", str(tiny_folder), "--out", str(tmp_path / "none"), *SMALL, "--resume"]) == 2
    assert "no unfinished run" in capsys.readouterr().err
    # without --resume, the interrupted run's folder is not silently replaced
    assert main(["compress", str(tiny_folder), "--out", str(out), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err
