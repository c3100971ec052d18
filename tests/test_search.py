"""The block-set search (evopress, fusegpt-evo, `fusegpt search`): fitness against brute force, the evolution's
rules, reproducibility, resume, and the CLI."""

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from fusegpt.api import compress, search
from fusegpt.config import CompressConfig
from fusegpt.data import DataSourceError, heldout_starts
from fusegpt.export import drop_blocks
from fusegpt.fusion import merge_fused_linears
from fusegpt.methods.search import mutate, stage_schedule
from fusegpt.runs import RecordLog

from conftest import random_ids, tiny_model

L, K, N, H = 8, 2, 4, 6  # blocks, removed, calibration windows, held-out windows
IDS = random_ids(N + H, 16, seed=5)  # rows N.. are the held-out windows


def _cfg(**kw):
    base = dict(remove=K, sparsity=None, nsamples=N, score_samples=N, seqlen=16, epochs=1, batch_size=2, lora_rank=4,
                coef_rank=4, device="cpu", group_size=3, compute_dtype="fp32", search_generations=2,
                search_offspring=4, search_fitness_samples=H, search_fuse_samples=4, search_stages=2)
    base.update(kw)
    return CompressConfig.from_dict(base)


@torch.no_grad()
def _kl(model, dense, ids) -> float:
    """Brute force: mean over tokens of KL(dense || model) of the next-token distributions (full forwards)."""
    s = F.log_softmax(model(ids).logits.float(), -1)
    t = F.log_softmax(dense(ids).logits.float(), -1)
    return float(F.kl_div(s, t, reduction="sum", log_target=True) / (ids.shape[0] * ids.shape[1]))


# ---- the evolution's rules -----------------------------------------------------------------------------------------
def test_mutation_swaps_removed_for_kept_blocks():
    rng = random.Random(0)
    parent = (1, 4, 6)
    seen = set()
    for _ in range(200):
        c = mutate(parent, 10, rng, 2)
        assert len(c) == 3 and len(set(c)) == 3 and list(c) == sorted(c) and all(0 <= b < 10 for b in c)
        assert 1 <= len(set(parent) - set(c)) <= 2
        seen.add(c)
    assert len(seen) > 20  # explores
    a, b = random.Random(3), random.Random(3)
    assert [mutate(parent, 10, a, 2) for _ in range(10)] == [mutate(parent, 10, b, 2) for _ in range(10)]


def test_stages_default_to_two_for_drop_and_one_for_fuse():
    from fusegpt.methods.search import stages_for

    assert stages_for("drop", 0) == 2 and stages_for("fuse", 0) == 1 and stages_for("fuse", 3) == 3


def test_stage_schedule_grows_windows_and_narrows_candidates():
    assert stage_schedule(8, 16, 2) == [(8, 2), (16, 1)]
    assert stage_schedule(16, 16, 3) == [(4, 4), (8, 1), (16, 1)]
    assert stage_schedule(5, 16, 1) == [(16, 1)]
    assert stage_schedule(3, 2, 3) == [(1, 1), (1, 1), (2, 1)]


def test_heldout_windows_share_no_token_with_the_calibration():
    g = torch.Generator().manual_seed(0)
    taken = [10, 500, 900]
    got = heldout_starts(2000, 20, 32, g, taken)
    spans = sorted([(s, s + 32) for s in got + taken])
    assert len(got) == 20 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(DataSourceError, match="room for only"):
        heldout_starts(200, 10, 32, torch.Generator().manual_seed(0), taken=[0])
    # free runs [0, 10), [42, 500), [532, 900), [932, 2000): 0 + 14 + 11 + 33 windows of 32 at most; a count above
    # that is refused before any draw, with the bound
    with pytest.raises(DataSourceError, match="room for only 58 held-out"):
        heldout_starts(2000, 59, 32, torch.Generator().manual_seed(0), taken)
    with pytest.raises(DataSourceError, match="room for only"):
        heldout_starts(10**6, 10**5, 32, torch.Generator().manual_seed(0), [])


# ---- fitness = brute force -----------------------------------------------------------------------------------------
def test_drop_fitness_is_the_kl_of_plain_removal():
    dense = tiny_model("llama", num_layers=L)
    res = search(copy.deepcopy(dense), _cfg(search_generations=1), fitness="drop", calib_ids=IDS)
    assert res.heldout and res.windows == H
    assert {e["windows"] for e in res.evaluations} == {H // 2, H}  # two stages
    for e in res.evaluations:  # every stage's value is the KL of that set on its first windows
        model = copy.deepcopy(dense)
        drop_blocks(model, e["blocks"])
        want = _kl(model, dense, IDS[N : N + e["windows"]])
        assert e["fitness"] == pytest.approx(want, rel=1e-4, abs=1e-7), e
    assert res.best_fitness <= res.seed_fitness


def test_fuse_fitness_is_the_kl_after_the_cheap_fusion():
    dense = tiny_model("llama", num_layers=L)
    res = search(copy.deepcopy(dense), _cfg(search_generations=0), fitness="fuse", calib_ids=IDS)
    assert res.best == res.seed and len(res.evaluations) == 1
    # brute force: fusegpt with the seed set in the one-shot order, the search's cheap budget, on a fresh copy
    model = copy.deepcopy(dense)
    cheap = _cfg(method="fusegpt", blocks=res.order, nsamples=4, score_samples=4, epochs=1)
    compress(model, cheap, calib_ids=IDS[:4])
    for m in model.modules():
        merge_fused_linears(m)
    assert res.seed_fitness == pytest.approx(_kl(model, dense, IDS[N : N + H]), rel=1e-4)
    # MI greedy = the one-shot MI order of fusegpt
    ref = compress(copy.deepcopy(dense), _cfg(method="drop-mi"), calib_ids=IDS)
    assert res.order == ref.removed


# ---- search rules, reproducibility, resume --------------------------------------------------------------------------
def test_search_is_elitist_reproducible_and_resumes_from_its_records(tmp_path):
    dense = tiny_model("llama", num_layers=L)
    cfg = _cfg(search_generations=4, search_offspring=3)
    a = search(copy.deepcopy(dense), cfg, fitness="drop", calib_ids=IDS, records=RecordLog(tmp_path / "r.jsonl"))
    b = search(copy.deepcopy(dense), cfg, fitness="drop", calib_ids=IDS)
    assert [e["blocks"] for e in a.evaluations] == [e["blocks"] for e in b.evaluations]
    assert a.best == b.best and a.best_fitness == b.best_fitness
    best = [g["best_fitness"] for g in a.generations]
    assert all(x >= y for x, y in zip(best, best[1:])) and best[-1] == a.best_fitness <= a.seed_fitness
    for e in a.evaluations:
        assert len(set(e["blocks"])) == K and all(0 <= x < L for x in e["blocks"])
    # every evaluation on record: a second search replays them all
    c = search(copy.deepcopy(dense), cfg, fitness="drop", calib_ids=IDS, records=RecordLog(tmp_path / "r.jsonl"))
    assert c.computed == 0 and c.best == a.best and [e["fitness"] for e in c.evaluations] == \
        [e["fitness"] for e in a.evaluations]
    # a search cut short (its last records lost, the last one half-written) continues to the same result
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    d = search(copy.deepcopy(dense), cfg, fitness="drop", calib_ids=IDS, records=RecordLog(tmp_path / "cut.jsonl"))
    assert 0 < d.computed < a.computed and d.best == a.best and d.best_fitness == a.best_fitness


def test_fusegpt_evo_fuses_the_searched_order_and_resumes(tmp_path):
    dense = tiny_model("llama", num_layers=L)
    cfg = _cfg(method="fusegpt-evo", search_generations=1, search_offspring=2, search_fitness="drop")
    whole = copy.deepcopy(dense)
    rep = compress(whole, cfg, calib_ids=IDS)
    found = search(copy.deepcopy(dense), cfg, fitness="drop", calib_ids=IDS)
    assert rep.removed == found.order
    assert rep.steps[0].extra["search"]["best"] == found.best and rep.steps[0].scores is not None

    class Crash(Exception):
        pass

    def crash(step):
        if step.step == 0:
            raise Crash

    first = copy.deepcopy(dense)
    with pytest.raises(Crash):
        compress(first, cfg, calib_ids=IDS, checkpoint_dir=tmp_path / "run", on_step=crash)
    again = copy.deepcopy(dense)
    rep2 = compress(again, cfg, calib_ids=IDS, checkpoint_dir=tmp_path / "run", resume=True)
    assert rep2.resumed_after_step == 1 and rep2.removed == rep.removed
    assert rep2.steps[0].extra["search"]["best"] == found.best
    for m in (whole, again):
        for mod in m.modules():
            merge_fused_linears(mod)
    sa, sb = whole.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_evopress_removes_the_best_drop_set():
    dense = tiny_model("llama", num_layers=L)
    rep = compress(copy.deepcopy(dense), _cfg(method="evopress"), calib_ids=IDS)
    s = rep.steps[0].extra["search"]
    assert sorted(rep.removed) == s["best"] and s["fitness"] == "drop" and s["heldout"]
    model = copy.deepcopy(dense)
    drop_blocks(model, rep.removed)
    assert s["best_fitness"] == pytest.approx(_kl(model, dense, IDS[N : N + H]), rel=1e-4)


# ---- CLI -------------------------------------------------------------------------------------------------------------
def test_search_cli_writes_json_and_plot_and_refuses_to_overwrite(tiny_folder, tmp_path, capsys):
    from fusegpt.cli import main

    out = tmp_path / "s"
    argv = ["search", str(tiny_folder), "--remove", "1", "--fitness", "drop", "--generations", "2", "--offspring",
            "2", "--search-fitness-samples", "2", "--nsamples", "2", "--score-samples", "2", "--seqlen", "16",
            "--group-size", "3", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "search.json").read_text())
    r = data["result"]
    assert data["fitness"] == "drop" and r["heldout"] and r["windows"] == 2 and len(r["generations"]) == 3
    assert (out / "search.png").stat().st_size > 0 and "--blocks" in data["compress_best"]
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2 and "finished already" in capsys.readouterr().err
    (out / "search.json").unlink()
    assert main([*argv, "--resume"]) == 0
    again = json.loads((out / "search.json").read_text())["result"]
    assert again["computed"] == 0 and again["best"] == r["best"]
    (out / "search.json").unlink()
    assert main([*argv, "--resume", "--generations", "3"]) == 2 and "different" in capsys.readouterr().err


def test_search_cli_refuses_what_does_not_fit(tiny_folder, tmp_path, capsys):
    from fusegpt.cli import main

    out = tmp_path / "s"
    assert main(["search", str(tiny_folder), "--remove", "1", "--search-fitness-samples", "100000", "--seqlen", "16",
                 "--group-size", "3", "--out", str(out)]) == 2
    assert "room for only" in capsys.readouterr().err and not out.exists()
    assert main(["search", str(tiny_folder), "--remove", "1", "--search-offspring", "0", "--out", str(out)]) == 2
    assert "--search-offspring must be >= 1" in capsys.readouterr().err and not out.exists()
