"""Zero-shot tasks through lm-evaluation-harness, on data shipped with the package (no hub).

Every task mirrors the prompt format and metrics of lm-evaluation-harness's own task of the same name
(0.4.x YAMLs: arc_easy, arc_challenge, piqa, boolq, openbookqa, lambada_openai, mmlu), with
``dataset_path: json`` pointing at JSONL files that fusegpt converts once from the shipped originals into the
Hugging Face schema those YAMLs expect. Only these local tasks are visible (``include_defaults=False``).
MMLU is the pre-release git copy of the test CSVs (14,079 rows; the final release has 14,042), 0-shot only:
no dev split is shipped, so 5-shot is not offered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

__all__ = [
    "TASKS", "ALIASES", "MissingExtraError", "require_lm_eval", "resolve_tasks", "prepare_task_dir", "evaluate_tasks",
    "task_average",
]

_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _read(rel: str) -> str:
    return resources.files("fusegpt").joinpath("_data", "tasks", rel).read_text(encoding="utf-8")


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _arc(name: str) -> Callable[[], list[dict]]:
    def convert() -> list[dict]:
        out = []
        for r in _jsonl(_read(f"arc/{name}-Test.jsonl")):
            ch = r["question"]["choices"]
            out.append({"id": r["id"], "question": r["question"]["stem"],
                        "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]},
                        "answerKey": r["answerKey"]})
        return out

    return convert


def _piqa() -> list[dict]:
    labels = [int(x) for x in _read("piqa/valid-labels.lst").split()]
    docs = _jsonl(_read("piqa/valid.jsonl"))
    if len(labels) != len(docs):
        raise ValueError("PIQA labels and questions differ in length")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]


def _boolq() -> list[dict]:
    out = []
    for r in _jsonl(_read("boolq/val.jsonl")):
        label = r["label"]
        label = int(label.lower() == "true") if isinstance(label, str) else int(label)
        out.append({"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": label})
    return out


def _openbookqa() -> list[dict]:
    rows = list(csv.reader(io.StringIO(_read("openbookqa/test.tsv")), delimiter="\t"))
    out = []
    for r in rows[1:]:
        parts = re.split(r"\(([A-D])\) ", r[2])[1:]
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        out.append({"id": r[0], "question_stem": r[1], "choices": {"text": texts, "label": labels},
                    "answerKey": r[4].strip()})
    return out


def _lambada() -> list[dict]:
    return _jsonl(_read("lambada/lambada_test.jsonl"))


def _mmlu_subjects() -> list[str]:
    folder = resources.files("fusegpt").joinpath("_data", "tasks", "mmlu")
    return sorted(p.name[: -len("_test.csv")] for p in folder.iterdir() if p.name.endswith("_test.csv"))


def _mmlu(subject: str) -> Callable[[], list[dict]]:
    def convert() -> list[dict]:
        out = []
        for r in csv.reader(io.StringIO(_read(f"mmlu/{subject}_test.csv"))):
            out.append({"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())})
        return out

    return convert


def _mc(task: str, text: str, target: str, choice: Any, metrics=None, **extra) -> dict:
    return {"task": task, "output_type": "multiple_choice", "doc_to_text": text, "doc_to_target": target,
            "doc_to_choice": choice, "metric_list": metrics or _MC_METRICS, "metadata": {"version": 1.0}, **extra}


# task name -> (converter, YAML fields without the dataset part); prompts as in lm-eval's own YAMLs
TASKS: dict[str, tuple[Callable[[], list[dict]], dict]] = {
    "arc_easy": (_arc("ARC-Easy"), _mc("arc_easy", "Question: {{question}}\nAnswer:",
                                       "{{choices.label.index(answerKey)}}", "{{choices.text}}")),
    "arc_challenge": (_arc("ARC-Challenge"), _mc("arc_challenge", "Question: {{question}}\nAnswer:",
                                                 "{{choices.label.index(answerKey)}}", "{{choices.text}}")),
    "piqa": (_piqa, _mc("piqa", "Question: {{goal}}\nAnswer:", "label", "{{[sol1, sol2]}}")),
    "boolq": (_boolq, _mc("boolq", "{{passage}}\nQuestion: {{question}}?\nAnswer:", "label", ["no", "yes"],
                          metrics=[{"metric": "acc"}], metadata={"version": 2.0})),
    "openbookqa": (_openbookqa, _mc("openbookqa", "question_stem", "{{choices.label.index(answerKey.lstrip())}}",
                                    "{{choices.text}}")),
    "lambada_openai": (_lambada, {
        "task": "lambada_openai", "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}),
}
for _s in _mmlu_subjects():
    TASKS[f"mmlu_{_s}"] = (_mmlu(_s), _mc(
        f"mmlu_{_s}",
        "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "answer", ["A", "B", "C", "D"], metrics=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        description=f"The following are multiple choice questions (with answers) about {_s.replace('_', ' ')}.\n\n",
        task_alias=_s))

GROUPS = {"mmlu": [f"mmlu_{s}" for s in _mmlu_subjects()]}
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}
DEFAULT_TASKS = ["arc_easy", "arc_challenge", "piqa", "boolq", "openbookqa", "lambada_openai", "mmlu"]


class MissingExtraError(ImportError):
    """An optional extra that a command needs is not installed."""


def require_lm_eval() -> None:
    """Refuse zero-shot tasks, before anything is loaded, when the ``eval`` extra is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise MissingExtraError("zero-shot tasks need lm-evaluation-harness: pip install 'fusegpt[eval]'")


def resolve_tasks(names: Iterable[str]) -> list[str]:
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in TASKS and n not in GROUPS:
            raise ValueError(f"unknown task {n!r}; available: {', '.join(DEFAULT_TASKS)} "
                             f"(aliases {', '.join(f'{a}={b}' for a, b in ALIASES.items())}) or mmlu_<subject>")
        out.append(n)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_task_dir(root: Path | None = None) -> Path:
    """Convert the shipped data and write the task YAMLs once (cached by content hash)."""
    import yaml

    from .. import __version__
    from ..models import cache_dir

    h = hashlib.sha256(json.dumps({k: v[1] for k, v in TASKS.items()}, sort_keys=True).encode())
    h.update(__version__.encode())
    root = (root or cache_dir() / "lm_eval") / h.hexdigest()[:12]
    done = root / ".complete"
    if done.exists():
        return root
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, (convert, fields) in TASKS.items():
        data = root / "data" / f"{name}.jsonl"
        _write_atomic(data, "".join(json.dumps(d) + "\n" for d in convert()))
        spec = {**fields, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test"}
        _write_atomic(root / f"{name}.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    for group, members in GROUPS.items():
        spec = {"group": group, "task": members,
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
        _write_atomic(root / f"_{group}.yaml", yaml.safe_dump(spec, sort_keys=False))
    done.write_text("ok")
    return root


def evaluate_tasks(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                   num_fewshot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Run tasks through lm-eval's HF model class; returns lm-eval's results dict (JSON-safe parts) + timings."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    tasks = resolve_tasks(tasks)
    task_dir = prepare_task_dir()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    seconds: dict[str, float] = {}
    merged: dict[str, Any] = {"results": {}, "groups": {}, "n-samples": {}, "versions": {}}
    for task in tasks:  # one call per requested task, so each task's time is known
        t = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
        seconds[task] = time.perf_counter() - t
        for key in ("results", "groups", "n-samples", "versions"):
            merged[key].update(res.get(key) or {})
        merged.setdefault("table", []).append(_table(res))
    merged["seconds"] = seconds
    merged["requested"] = tasks
    merged["limit"] = limit
    merged["num_fewshot"] = num_fewshot
    merged["average"] = task_average(merged["results"], tasks)
    return merged


def _table(res: dict) -> str:
    from lm_eval.utils import make_table

    out = make_table(res)
    if res.get("groups"):
        out += "\n" + make_table(res, "groups")
    return out


def task_average(results: dict[str, dict], tasks: list[str]) -> dict[str, float]:
    """Mean over the requested tasks of acc (every task) and acc_norm (where reported)."""
    accs = [results[t]["acc,none"] for t in tasks if "acc,none" in results.get(t, {})]
    norms = [results[t]["acc_norm,none"] for t in tasks if "acc_norm,none" in results.get(t, {})]
    return {"acc": sum(accs) / len(accs) if accs else float("nan"),
            "acc_norm": sum(norms) / len(norms) if norms else float("nan"), "tasks": len(accs)}
