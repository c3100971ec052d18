"""`fusegpt compare` on a tiny model: rows, recovery, shared evaluation, reproducible commands, resume."""

import json
import math
import shlex

import pytest

from fusegpt.cli import main

SMALL = ["--nsamples", "4", "--score-samples", "2", "--seqlen", "32", "--epochs", "1", "--batch-size", "2",
         "--lora-rank", "4", "--coef-rank", "4", "--group-size", "3", "--device", "cpu"]
EVAL = ["--eval-seqlen", "32", "--eval-windows", "4"]
METHODS = "shortgpt,laco,fusegpt,magnitude"


@pytest.fixture(scope="module")
def compared(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    rc = main(["compare", str(tiny_folder), "--sparsity", "0.2,0.4", "--methods", METHODS, "--out", str(out),
               *SMALL, *EVAL])
    assert rc == 0
    return out


def test_compare_writes_table_json_plot(compared):
    data = json.loads((compared / "compare.json").read_text())
    rows = data["rows"]
    got = {(r["method"], r["sparsity"]) for r in rows}
    want = {("dense", 0.0)} | {(m, s) for m in ["drop-mi", *METHODS.split(",")] for s in (0.2, 0.4)}
    assert got == want  # drop-mi (the naive reference) is always added
    for r in rows:
        assert set(r) >= {"method", "sparsity", "removed", "params", "ppl", "recovery", "seconds", "command"}
        if r["method"] != "dense":
            assert len(r["removed"]) == {0.2: 2, 0.4: 3}[r["sparsity"]]
            assert r["layers"] == 6 - len(r["removed"])
    naive = {r["sparsity"]: r for r in rows if r["method"] == "drop-mi"}
    dense = next(r for r in rows if r["method"] == "dense")
    for r in rows:
        if r["method"] == "drop-mi":
            assert r["recovery"] == pytest.approx(0.0)
        elif r["method"] != "dense":
            n = naive[r["sparsity"]]["ppl"]
            want = (math.log(n) - math.log(r["ppl"])) / (math.log(n) - math.log(dense["ppl"]))
            assert r["recovery"] == pytest.approx(want)
    md = (compared / "compare.md").read_text()
    assert "recovery vs naive" in md and "fusegpt compress" in md
    assert (compared / "pareto.png").stat().st_size > 1000


def test_drop_methods_with_the_same_blocks_share_one_evaluation(tiny_folder, tmp_path, monkeypatch):
    """A twin of drop-mi (same scorer, another name) must pick the same blocks and reuse drop-mi's evaluation
    instead of running its own: the shared row names its source and costs no evaluation time."""
    import fusegpt.compare as cmp
    import fusegpt.methods.base as base

    monkeypatch.setitem(base._METHODS, "drop-mi-twin", base._METHODS["drop-mi"])
    monkeypatch.setitem(base._INFO, "drop-mi-twin", base.MethodInfo("drop-mi-twin", "drop", "test twin"))
    evaluated = []
    real = cmp.evaluate_perplexity

    def counting(model, *a, **k):
        evaluated.append(model.config.num_hidden_layers)
        return real(model, *a, **k)

    monkeypatch.setattr(cmp, "evaluate_perplexity", counting)
    out = tmp_path / "twin"
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2", "--methods", "drop-mi-twin", "--out", str(out),
                 *SMALL, *EVAL]) == 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    twin, naive = rows["drop-mi-twin"], rows["drop-mi"]
    assert twin["removed"] == naive["removed"]
    assert twin["eval_shared_with"] == "drop-mi@0.2" and naive["eval_shared_with"] is None
    assert twin["ppl"] == naive["ppl"]
    assert len(evaluated) == 2  # dense and drop-mi; the twin evaluated nothing


def test_row_command_reproduces_the_row(compared, tiny_folder, tmp_path):
    rows = json.loads((compared / "compare.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "laco" and r["sparsity"] == 0.4)
    argv = shlex.split(row["command"])[1:]
    out = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(out)
    assert main([*argv, "--device", "cpu", "--no-eval"]) == 0
    rep = json.loads((out / "fusegpt_report.json").read_text())
    assert rep["removed"] == row["removed"]
    # the exported checkpoint evaluates to the row's PPL under the compare's protocol
    assert main(["eval", str(out), "--seqlen", "32", "--max-windows", "4", "--json", str(tmp_path / "e.json"),
                 "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "e.json").read_text())["perplexity"]["ppl"]
    assert got == pytest.approx(row["ppl"], rel=1e-4)


def test_resume_and_refusal(compared, tiny_folder, capsys):
    rows_file = compared / "rows.jsonl"
    lines = rows_file.read_text().splitlines()
    before = json.loads((compared / "compare.json").read_text())["rows"]
    # without --resume / --overwrite a non-empty folder is refused (exit 2, nothing lost)
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2,0.4", "--methods", METHODS,
                 "--out", str(compared), *SMALL, *EVAL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert rows_file.read_text().splitlines() == lines
    # drop the last finished row (as if interrupted) and resume: only that row is recomputed
    rows_file.write_text("\n".join(lines[:-1]) + "\n")
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2,0.4", "--methods", METHODS,
                 "--out", str(compared), "--resume", *SMALL, *EVAL]) == 0
    after = json.loads((compared / "compare.json").read_text())["rows"]
    key = lambda r: (r["method"], r["sparsity"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, before))
    last = json.loads(lines[-1])
    redo = next(r for r in after if key(r) == key(last))
    assert redo["removed"] == last["removed"] and redo["ppl"] == pytest.approx(last["ppl"], rel=1e-5)
    # resuming with different settings is refused
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2,0.4", "--methods", METHODS,
                 "--out", str(compared), "--resume", *SMALL, "--eval-seqlen", "16", "--eval-windows", "4"]) == 2


def test_unknown_method_is_a_clear_error(tiny_folder, tmp_path, capsys):
    assert main(["compare", str(tiny_folder), "--methods", "fusegpt,nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compare_with_zero_shot_tasks(tiny_folder, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmpz"
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2", "--methods", "drop-mi", "--out", str(out),
                 "--tasks", "arc_easy,boolq", "--limit", "4", *SMALL, *EVAL]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert len(rows) == 2  # dense + drop-mi
    for r in rows:
        assert set(r["tasks"]) == {"arc_easy", "boolq"}
        assert r["task_average"] == pytest.approx(sum(r["tasks"].values()) / 2)
    assert "zero-shot avg" in (out / "compare.md").read_text()


def test_compare_rows_of_the_searches(tiny_folder, tmp_path):
    """evopress and fusegpt-evo rows: held-out windows drawn once for both, the search's summary in the row, and a
    reproduce command that carries the search options."""
    out = tmp_path / "search"
    opts = ["--search-generations", "1", "--search-offspring", "2", "--search-fitness-samples", "2",
            "--search-fuse-samples", "2"]
    assert main(["compare", str(tiny_folder), "--sparsity", "0.2", "--methods", "evopress,fusegpt-evo", "--out",
                 str(out), *SMALL, *EVAL, *opts]) == 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for m, fitness in (("evopress", "drop"), ("fusegpt-evo", "fuse")):
        s = rows[m]["extra"]["search"]
        assert s["fitness"] == fitness and len(s["best"]) == 2 and s["best_fitness"] <= s["seed_fitness"]
        assert "--search-generations 1" in rows[m]["command"] and f"--method {m}" in rows[m]["command"]
    assert sorted(rows["evopress"]["removed"]) == rows["evopress"]["extra"]["search"]["best"]
