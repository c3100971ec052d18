"""The compute-dtype policy and the bf16 path, tested on purpose on every machine (with bf16 tolerances).

Machines differ: where the CPU has native bf16, ``--compute-dtype auto`` measures it faster and picks it; elsewhere
it stays in fp32. Tests that compare with fp32 brute force pin ``compute_dtype="fp32"``; these tests ask for bf16
explicitly, so the bf16 arithmetic is exercised whatever ``auto`` would choose here. ``FUSEGPT_AUTO_DTYPE`` forces
``auto`` (the Makefile runs the suite once with each value).
"""


import pytest
import torch
import torch.nn.functional as F

from fusegpt import device as dev
from fusegpt.activations import ActivationCache, Runner
from fusegpt.adapters import get_adapter
from fusegpt.api import compress
from fusegpt.config import CompressConfig
from fusegpt.export import export_model
from fusegpt.scoring import macro_influence_scores

from conftest import final_hidden_without, random_ids, tiny_model

CPU = torch.device("cpu")
IDS = random_ids(4, 16, seed=3)


def test_auto_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv(dev.AUTO_DTYPE_ENV, "bf16")
    assert dev.choose_compute_dtype(CPU, "auto") == torch.bfloat16
    assert dev.choose_compute_dtype(CPU, "fp32") is None  # an explicit request wins over the switch
    monkeypatch.setenv(dev.AUTO_DTYPE_ENV, "fp32")
    assert dev.choose_compute_dtype(CPU, "auto") is None
    assert dev.choose_compute_dtype(CPU, "bf16") == torch.bfloat16
    monkeypatch.setenv(dev.AUTO_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        dev.choose_compute_dtype(CPU, "auto")


@pytest.mark.parametrize("flags", [True, None])  # the flags name bf16 instructions, or cannot be read
@pytest.mark.parametrize("fp32,bf16,want", [(1.0, 2.4, torch.bfloat16), (1.0, 1.2, None), (80.0, 1.0, None)])
def test_auto_measures_when_not_forced(monkeypatch, flags, fp32, bf16, want):
    monkeypatch.delenv(dev.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: flags)
    speed = {torch.float32: fp32, torch.bfloat16: bf16}
    monkeypatch.setattr(dev, "matmul_flops_per_second", lambda d, dtype, n=0, repeats=0: speed[dtype])
    assert dev.choose_compute_dtype(CPU, "auto") == want


def test_auto_is_fp32_without_measuring_where_the_flags_show_no_bf16(monkeypatch):
    monkeypatch.delenv(dev.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)

    def never(*args, **kwargs):
        raise AssertionError("measured although the flags settle it")

    monkeypatch.setattr(dev, "matmul_flops_per_second", never)
    assert dev.choose_compute_dtype(CPU, "auto") is None


def test_one_slow_fp32_reading_does_not_pick_bf16(monkeypatch):
    # the failure seen on a 2-core VM without native bf16: fp32 measured in a slow moment (here 10 against its
    # usual 100) once made auto choose bf16, which runs 2.5x slower there; the readings are interleaved and the
    # fastest of each dtype compared
    monkeypatch.delenv(dev.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: None)
    readings = {torch.float32: iter([10.0, 100.0, 100.0]), torch.bfloat16: iter([40.0, 40.0, 40.0])}
    monkeypatch.setattr(dev, "matmul_flops_per_second", lambda d, dtype, n=0, repeats=0: next(readings[dtype]))
    assert dev.bf16_speedup(CPU) == pytest.approx(0.4)
    readings = {torch.float32: iter([10.0, 100.0, 100.0]), torch.bfloat16: iter([40.0, 40.0, 40.0])}
    assert dev.choose_compute_dtype(CPU, "auto") is None


def test_compress_decides_auto_once_for_the_plan_and_the_run(tiny_folder, tmp_path, monkeypatch):
    """The plan printed at start and the run compute in one dtype: ``auto`` is decided once (a second measurement
    could disagree with the first: here it would say bf16)."""
    import json

    from fusegpt.cli import main

    readings = iter([1.0, 2.0])
    calls = []
    monkeypatch.delenv(dev.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(dev, "bf16_speedup", lambda d, n=512, rounds=3: calls.append(d) or next(readings))
    out = tmp_path / "out"
    assert main(["compress", str(tiny_folder), "--out", str(out), "--remove", "1", "--nsamples", "4",
                 "--score-samples", "4", "--seqlen", "32", "--epochs", "1", "--group-size", "3", "--batch-size", "4",
                 "--compute-dtype", "auto", "--no-consolidate"]) == 0
    rep = json.loads((out / "fusegpt_report.json").read_text())
    assert len(calls) == 1
    assert rep["compute_dtype"] == rep["plan"]["plan"]["compute_dtype"] == "torch.float32"


_RANKS = """
import sys
from pathlib import Path

import torch
from fusegpt import api, distributed
from fusegpt.config import CompressConfig

distributed.init_from_env("cpu")
# the two processes measure differently: rank 1 would pick bf16
api.choose_compute_dtype = lambda d, req: torch.bfloat16 if distributed.rank() == 1 else None
got = api.resolve_compute_dtype(CompressConfig(compute_dtype="auto", device="cpu"))
# one file per rank: two ranks printing to one pipe can interleave their lines
Path(sys.argv[1], f"rank{distributed.rank()}.txt").write_text(str(got))
distributed.shutdown()
"""


def test_every_rank_takes_rank_0s_auto_dtype(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["torch.float32", "torch.float32"]


@pytest.mark.parametrize("cpuinfo,want", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),  # AVX-512 but no bf16
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm FEAT_BF16 (e.g. Neoverse V1)
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),
    ("", None),  # nothing readable: measure instead
])
def test_cpu_flags_parsing(cpuinfo, want):
    assert dev.cpu_has_native_bf16(cpuinfo) is want


def _mi(model, dtype):
    runner = Runner.for_model(get_adapter(model), 16, device=CPU, batch_size=2, compute_dtype=dtype)
    return macro_influence_scores(ActivationCache(runner, IDS), desc=None)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_macro_influence_close_to_fp32_brute_force(family):
    model = tiny_model(family)
    full = final_hidden_without(model, IDS, None)
    brute = [1 - F.cosine_similarity(full, final_hidden_without(model, IDS, i), dim=-1).mean().item()
             for i in range(6)]
    bf16 = _mi(model, torch.bfloat16)
    fp32 = _mi(model, None)
    assert fp32 == pytest.approx(brute, rel=1e-4, abs=1e-6)
    # bf16 keeps 8 mantissa bits: scores agree to a few percent of the largest score ...
    assert bf16 == pytest.approx(brute, abs=0.03 * max(brute))
    # ... and really are computed in bf16 (else this test would check fp32 twice)
    assert bf16 != pytest.approx(fp32, rel=1e-5, abs=1e-7)


def _cfg(**kw):
    base = dict(remove=2, sparsity=None, group_size=3, epochs=3, nsamples=8, score_samples=4, seqlen=16,
                coef_rank=4, lora_rank=4, batch_size=4, coef_lr=1e-2, lr=1e-3, compute_dtype="bf16", device="cpu")
    base.update(kw)
    return CompressConfig(**base)


def test_bf16_fusegpt_trains_fp32_masters_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", 8)
    ids = random_ids(8, 16)
    rep = compress(model, _cfg(), calib_ids=ids)
    assert rep.compute_dtype == "torch.bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32
    for s in rep.steps:
        assert not s.nonfinite and s.train_steps > 0
        assert s.loss_after < s.loss_before  # distillation helps in bf16 too
    out = export_model(model, None, tmp_path / "m", metadata={})
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = back(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_baseline_scores_close_to_fp32():
    for method, rel in (("shortgpt", 0.05), ("sleb", 0.02), ("taylor", 0.1)):
        r32 = compress(tiny_model("llama", 8), _cfg(method=method, remove=1, nsamples=4, compute_dtype="fp32"),
                       calib_ids=IDS)
        r16 = compress(tiny_model("llama", 8), _cfg(method=method, remove=1, nsamples=4), calib_ids=IDS)
        s32, s16 = r32.steps[0].scores, r16.steps[0].scores
        assert s16 == pytest.approx(s32, rel=rel, abs=rel * max(s32.values())), method
        assert s16 != pytest.approx(s32, rel=1e-6, abs=1e-9), method


def test_the_report_divides_by_the_faster_of_two_peak_readings(monkeypatch):
    """compress reads the matmul peak before and after the run and divides by the faster reading: a slow moment
    at the start must not make the loop look faster than the machine allows."""
    import fusegpt.api as api

    readings = iter([1e9, 4e9])  # start: a slow moment; after the run: the machine's real rate
    monkeypatch.setattr(api, "matmul_flops_per_second", lambda d, dtype, n=0, repeats=0: next(readings))
    rep = compress(tiny_model("llama", 8), _cfg(remove=1, nsamples=4, compute_dtype="fp32"), calib_ids=IDS)
    assert rep.matmul_peak_flops == 4e9
    assert rep.flops_fraction_of_peak == pytest.approx(rep.flops["total"] / rep.seconds / 4e9)
    readings = iter([4e9, 1e9])  # a slow moment at the end does not lower it either
    rep = compress(tiny_model("llama", 8), _cfg(remove=1, nsamples=4, compute_dtype="fp32"), calib_ids=IDS)
    assert rep.matmul_peak_flops == 4e9
