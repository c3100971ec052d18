"""Data parallelism: torchrun with 2 gloo processes on the CPU gives one process's scores, blocks and weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--remove", "2", "--mode", "iterative", "--group-size", "2", "--nsamples", "8", "--score-samples", "4",
        "--seqlen", "32", "--batch-size", "4", "--epochs", "2", "--threads", "1", "--compute-dtype", "fp32"]


def _run(cmd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _torchrun(n, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "fusegpt",
            *args]


@pytest.mark.parametrize("loss", ["mse", "kl-batch"])  # kl-batch couples the samples of a mini-batch
def test_two_gloo_processes_equal_one(tiny_folder, tmp_path, loss):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "fusegpt", "compress", str(tiny_folder), *ARGS, "--loss", loss, "--out", str(one)])
    _run(_torchrun(2, ["compress", str(tiny_folder), *ARGS, "--loss", loss, "--out", str(two)]))
    a = json.loads((one / "fusegpt_report.json").read_text())
    b = json.loads((two / "fusegpt_report.json").read_text())
    assert a["removed"] == b["removed"]
    for sa, sb in zip(a["steps"], b["steps"]):  # MI of every candidate, scored by the two ranks in turn
        assert sa["scores"].keys() == sb["scores"].keys()
        for k in sa["scores"]:
            assert abs(sa["scores"][k] - sb["scores"][k]) <= 1e-5
        assert sa["train_steps"] == sb["train_steps"]
        assert sa["loss_after"] == pytest.approx(sb["loss_after"], rel=1e-4)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        scale = wa[k].abs().max().clamp_min(1e-6)
        assert ((wa[k] - wb[k]).abs().max() / scale).item() < 1e-4, k
    # the perplexity is evaluated over windows split between the ranks and summed
    assert a["evaluation"]["wikitext2"]["ppl"] == pytest.approx(b["evaluation"]["wikitext2"]["ppl"], rel=1e-4)
    assert not any(p.name.startswith(".fusegpt-run") for p in two.iterdir())


def test_two_processes_stream_blocks_from_disk(tiny_folder, tmp_path):
    """--offload disk under torchrun: the ranks change the same blocks, rank 0 alone writes them to the run's work
    folder (two writers of one file broke the run) and every rank reads them back; the result equals one process
    holding the model in memory (no final stage in either: it cannot stream)."""
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "fusegpt", "compress", str(tiny_folder), *ARGS, "--final-epochs", "0", "--out",
          str(one)])
    _run(_torchrun(2, ["compress", str(tiny_folder), *ARGS, "--offload", "disk", "--out", str(two)]))
    a = json.loads((one / "fusegpt_report.json").read_text())
    b = json.loads((two / "fusegpt_report.json").read_text())
    assert a["removed"] == b["removed"]
    assert [s["loss_after"] for s in a["steps"]] == pytest.approx([s["loss_after"] for s in b["steps"]], rel=1e-4)
    wa = AutoModelForCausalLM.from_pretrained(one).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(two).state_dict()  # one shard per block
    assert wa.keys() == wb.keys()
    for k in wa:
        scale = wa[k].abs().max().clamp_min(1e-6)
        assert ((wa[k] - wb[k]).abs().max() / scale).item() < 1e-4, k
    assert a["evaluation"]["wikitext2"]["ppl"] == pytest.approx(b["evaluation"]["wikitext2"]["ppl"], rel=1e-4)
    assert not (two / ".fusegpt-run").exists()


def test_uneven_batch_is_refused_under_two_processes(tiny_folder, tmp_path):
    args = [a if a != "4" else "3" for a in ARGS]  # --batch-size 3 (and --score-samples 3)
    res = subprocess.run(_torchrun(2, ["compress", str(tiny_folder), *args, "--out", str(tmp_path / "x")]),
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode != 0 and "multiples of 2" in res.stderr
    assert torch.distributed.is_available()


_FIT = """
import sys
from pathlib import Path

from fusegpt import api, distributed, plan
from fusegpt.config import CompressConfig

distributed.init_from_env("cpu")
# rank 1 has 64 KiB left, rank 0 plenty: the model fits rank 0 alone
api.available_memory_bytes = lambda d: (64 << 10) if distributed.rank() == 1 else (64 << 30)
cfg = CompressConfig.from_preset("cpu", remove=1, sparsity=None, nsamples=4, score_samples=4, seqlen=32,
                                 batch_size=4, device="cpu", compute_dtype="fp32")
got, why = plan.fit_offload(sys.argv[1], cfg, nproc=2)
# one file per rank: two ranks printing to one pipe can interleave their lines
Path(sys.argv[2], f"rank{distributed.rank()}.txt").write_text(f"{got.offload} {got.final_epochs} {why is not None}")
distributed.shutdown()
"""


def test_every_rank_streams_when_one_rank_lacks_memory(tiny_folder, tmp_path):
    """The streaming decision is the tightest rank's: a rank that streamed (and waits at the block store's
    barrier) beside one that did not would hang the run."""
    script = tmp_path / "fit.py"
    script.write_text(_FIT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
          str(tiny_folder), str(tmp_path)])
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["disk 0 True", "disk 0 True"]
