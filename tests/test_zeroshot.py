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


def _arc_by_hand(folder, n):
    """Per question, the summed log-probability of every " <choice>" after "Question: <q>\nAnswer:", computed
    without lm-eval (lm-eval's prompt, no special tokens, continuation tokens = the whole string's tokens past the
    context's), and the gold index."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for doc in TASKS["arc_easy"][0]()[:n]:
        ctx = f"Question: {doc['question']}\nAnswer:"
        cenc = tok(ctx, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]["text"]:
            whole = tok(ctx + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(cenc):]
            with torch.no_grad():
                logp = model(torch.tensor([(cenc + cont)[:-1]])).logits.log_softmax(-1)[0]
            lls.append(sum(float(logp[len(cenc) - 1 + i, t]) for i, t in enumerate(cont)))
        out.append((lls, doc["choices"]["label"].index(doc["answerKey"]), doc["choices"]["text"]))
    return out


def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def test_eval_one_task_matches_a_hand_computed_accuracy(tiny_folder, tmp_path, monkeypatch):
    """Through the CLI: acc and acc_norm (log-likelihood / choice length in characters) equal the hand-computed
    ones; through lm-eval with logged samples: every choice's log-likelihood equals the hand-computed one (so the
    prompt, the data conversion and the scoring are what the docs say)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "z.json"
    n = 16
    assert main(["eval", str(tiny_folder), "--tasks", "arc_easy", "--limit", str(n), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n-samples"]["arc_easy"]["effective"] == n
    hand = _arc_by_hand(tiny_folder, n)
    acc = sum(_argmax(lls) == gold for lls, gold, _ in hand) / n
    norm = sum(_argmax([ll / len(c) for ll, c in zip(lls, ch)]) == gold for lls, gold, ch in hand) / n
    got = data["results"]["arc_easy"]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx((acc, norm))
    assert data["average"]["acc"] == pytest.approx(acc)

    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_folder).eval(),
              tokenizer=AutoTokenizer.from_pretrained(tiny_folder), batch_size=4, backend="causal")
    res = simple_evaluate(model=lm, tasks=["arc_easy"], limit=n, log_samples=True,
                          task_manager=TaskManager(include_path=str(prepare_task_dir()), include_defaults=False))
    samples = sorted(res["samples"]["arc_easy"], key=lambda r: r["doc_id"])
    assert len(samples) == n
    for sample, (lls, gold, _) in zip(samples, hand):
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        assert sample["target"] == gold
