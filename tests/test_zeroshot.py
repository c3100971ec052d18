import json

import pytest

pytest.importorskip("lm_eval")

from fusegpt.cli import main
from fusegpt.evaluate.zeroshot import TASKS, prepare_task_dir, resolve_tasks


def test_shipped_task_data_converts(tmp_path):
    sizes = {name: len(conv()) for name, (conv, _) in TASKS.items() if not name.startswith("mmlu_")}
    assert sizes == {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "boolq": 3270, "openbookqa": 500,
                     "lambada_openai": 5153}
    assert sum(len(c()) for n, (c, _) in TASKS.items() if n.startswith("mmlu_")) == 14079
    obqa = TASKS["openbookqa"][0]()[0]
    assert obqa["choices"]["label"] == ["A", "B", "C", "D"] and obqa["answerKey"] == "B"
    root = prepare_task_dir(tmp_path)
    assert (root / "arc_easy.yaml").exists() and (root / "_mmlu.yaml").exists()


def test_unknown_task():
    with pytest.raises(ValueError, match="arc_easy"):
        resolve_tasks(["hellaswag"])
    assert resolve_tasks(["lambada"]) == ["lambada_openai"]


def test_eval_one_task_limit_8_tiny(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "z.json"
    assert main(["eval", str(tiny_folder), "--tasks", "arc_easy", "--limit", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert 0.0 <= data["results"]["arc_easy"]["acc,none"] <= 1.0
    assert data["n-samples"]["arc_easy"]["effective"] == 8
