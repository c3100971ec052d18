"""Block-set search: which k blocks to remove, found by an evolutionary search seeded by Macro Influence.

EvoPress (Sieberling et al. 2024) searches removal sets with a (1 + lambda) evolution: offspring are the parent with
a few removed and kept blocks swapped; they are ranked in stages on growing token budgets (most are dropped after
a few windows, the survivors are measured on more), and the best replaces the parent only when it is better
(elitism). The fitness is the KL divergence of the candidate's next-token distributions from the dense model's.
FuseGPT-Evo seeds the same search with the MI-greedy set and measures the candidate *after a cheap fusion*, so it
optimises what fusion recovers rather than what plain removal keeps.

- ``fitness = drop``: the candidate is plain removal; it runs only from its first removed block, starting from the
  dense model's cached activations of the held-out windows, and each stage computes only the windows it adds.
- ``fitness = fuse``: a copy of the model fuses the candidate (fixed order: ascending seed score, the one-shot
  order) with a small budget (``fuse_samples`` windows x ``fuse_epochs``), then runs from the first block the fusion
  changed. The fusion dominates the cost, so every held-out window is measured at once; ranking on fewer windows
  in early stages would only throw information away, so the stages default to one (``--search-stages 0`` = auto).

Fitness values are cached by block set; with a record log every evaluation is persisted as it finishes, so a
resumed search replays the same trajectory (same seed, same draws) without computing them again.

Methods: ``evopress`` (drop search, plain removal of the best set) and ``fusegpt-evo`` (search, then the full fusion
of the best set in the one-shot order); both read the ``search`` options (``--search-generations`` ...).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..activations import Runner
from ..adapters import get_adapter
from ..distill.losses import LossHead, logit_kl
from ..distributed import is_main
from ..options import option, register_options
from ..runs import RecordLog
from ..scoring import ORDERS
from .base import Job, StepReport, register_method
from .drop import remove_plan
from .fusegpt import FixedPlan, fuse_and_remove, pick_blocks

log = logging.getLogger(__name__)

__all__ = ["SearchOptions", "SearchResult", "Fitness", "mutate", "stage_schedule", "stages_for", "search_blocks",
           "FITNESS"]

FITNESS = ("drop", "fuse")


@dataclass
class SearchOptions:
    """The block-set search (``fusegpt search``, ``--method evopress`` / ``fusegpt-evo``)."""

    generations: int = option(5, "search: generations of the evolution (default 5)", minimum=0)
    offspring: int = option(6, "search: offspring per generation (default 6)", minimum=1)
    fitness: str = option("fuse", "search: fitness of fusegpt-evo and `fusegpt search`: fuse (KL after a cheap "
                                  "fusion, default) or drop (KL of plain removal); evopress is always drop",
                          choices=list(FITNESS))
    fitness_samples: int = option(16, "search: held-out calibration windows the fitness KL is measured on "
                                      "(default 16; they share no token with the --nsamples windows)", minimum=1)
    stages: int = option(0, "search: selection stages; windows double up to all of them at the last stage, the "
                            "best quarter of the offspring passes each stage; 0 = auto (default): 2 with drop "
                            "fitness, 1 with fuse fitness (its fusion measures every window at once)", minimum=0)
    max_swaps: int = option(2, "search: a mutation swaps 1..N removed blocks with kept ones (default 2)", minimum=1)
    fuse_samples: int = option(8, "search: calibration windows of the cheap fusion of fitness=fuse (default 8)",
                               minimum=1)
    fuse_epochs: int = option(1, "search: epochs of the cheap fusion of fitness=fuse (default 1)", minimum=1)


register_options("search", SearchOptions)


# ---- the evolution (pure) -----------------------------------------------------------------------------------------
def mutate(parent: tuple[int, ...], num_blocks: int, rng: random.Random, max_swaps: int) -> tuple[int, ...]:
    """The parent set with s (uniform in 1..max_swaps) removed blocks swapped for s kept ones (sorted)."""
    removed = sorted(parent)
    kept = [b for b in range(num_blocks) if b not in set(parent)]
    s = rng.randint(1, max(1, min(max_swaps, len(removed), len(kept))))
    out = set(removed)
    for r, k in zip(rng.sample(removed, s), rng.sample(kept, s)):
        out.discard(r)
        out.add(k)
    return tuple(sorted(out))


def stages_for(kind: str, stages: int) -> int:
    """The selection stages of a search: the option, or with 0 (auto) 2 for drop fitness (windows are computed
    stage by stage) and 1 for fuse fitness (every window is computed with the fusion)."""
    return stages if stages > 0 else (2 if kind == "drop" else 1)


def stage_schedule(offspring: int, windows: int, stages: int) -> list[tuple[int, int]]:
    """(windows, survivors) of every selection stage: the windows double up to all ``windows`` at the last stage;
    the best quarter (at least one) of the candidates passes each stage, the last keeps one."""
    out, n = [], offspring
    for s in range(stages):
        w = max(1, windows >> (stages - 1 - s))
        keep = 1 if s == stages - 1 else max(1, math.ceil(n / 4))
        out.append((w, keep))
        n = keep
    return out


# ---- fitness -------------------------------------------------------------------------------------------------------
class Fitness:
    """Mean next-token KL(dense || candidate) over the first n held-out windows, cached by block set and window.

    ``kind`` drop: plain removal of the set; fuse: the set fused (on a copy of the model) with the cheap budget of
    ``options``, in ascending ``order_scores``. ``values`` may be pre-filled from a record log (resume)."""

    def __init__(self, job: Job, ids: torch.Tensor, kind: str, options: SearchOptions,
                 order_scores: dict[int, float], records: RecordLog | None = None) -> None:
        if kind not in FITNESS:
            raise ValueError(f"fitness must be one of {FITNESS}, got {kind!r}")
        self.job, self.ids, self.kind, self.opt = job, ids, kind, options
        self.order_scores = order_scores
        self.cache = job.cache("fitness", ids)
        # the dense model's final hidden states, held once: every evaluation compares against them, and a bounded
        # cache keeps the last entry only when its depth happens to fall on a checkpoint
        self.ref = self.cache.get(job.runner.adapter.num_blocks)
        self.head = LossHead.for_runner(job.runner)
        self.values: dict[tuple[int, ...], list[float]] = {}
        self.seconds: dict[tuple[int, ...], float] = {}
        self.records = records
        self.computed = 0  # evaluations computed in this process (not replayed)
        if records is not None:
            for r in records.read():
                if "blocks" in r:
                    key = tuple(r["blocks"])
                    if len(r["values"]) > len(self.values.get(key, [])):
                        self.values[key] = [float(v) for v in r["values"]]
                        self.seconds[key] = self.seconds.get(key, 0.0) + float(r["seconds"])

    @property
    def windows(self) -> int:
        return self.ids.shape[0]

    def __call__(self, blocks: tuple[int, ...], n: int | None = None) -> float:
        n = self.windows if n is None else min(n, self.windows)
        have = self.values.setdefault(blocks, [])
        if len(have) < n:
            t = time.perf_counter()
            new = self._drop(blocks, len(have), n) if self.kind == "drop" else self._fuse(blocks)
            have += new[: (n - len(have)) if self.kind == "drop" else None]
            sec = time.perf_counter() - t
            self.seconds[blocks] = self.seconds.get(blocks, 0.0) + sec
            self.computed += 1
            if self.records is not None and is_main():  # under torch.distributed every rank reads, rank 0 writes
                self.records.append({"blocks": list(blocks), "values": have, "seconds": sec})
        return sum(have[:n]) / n

    def _kl(self, h: torch.Tensor, a: int) -> list[float]:
        """Per-window KL of hidden states h (windows a .. a + len(h)) against the dense model's."""
        dev = self.job.runner.device
        with torch.no_grad():
            return [float(logit_kl(h[w : w + 1].to(dev), self.ref[a + w : a + w + 1].to(dev), self.head))
                    for w in range(h.shape[0])]

    def _drop(self, blocks: tuple[int, ...], a: int, b: int) -> list[float]:
        runner = self.job.runner
        ad = runner.adapter
        first = min(blocks)
        gone = set(blocks)
        mods, kinds = list(ad.blocks), ad.block_kinds()
        keep = [i for i in range(first, ad.num_blocks) if i not in gone]
        m0 = runner.macs
        h = runner.run([mods[i] for i in keep], [kinds[i] for i in keep], self.cache.get(first)[a:b])
        out = self._kl(h, a)
        self.job.flops["search"] = self.job.flops.get("search", 0.0) + 2 * (runner.macs - m0)
        return out

    def _fuse(self, blocks: tuple[int, ...]) -> list[float]:
        job, o = self.job, self.opt
        plan = sorted(blocks, key=lambda b: (self.order_scores.get(b, 0.0), b))
        model = copy.deepcopy(job.adapter.model)
        ad = get_adapter(model)
        r = job.runner
        runner = Runner.for_model(ad, job.config.seqlen, device=r.device, offload=r.offload, batch_size=r.batch_size,
                                  compute_dtype=r.compute_dtype)
        runner.grad_checkpoint = r.grad_checkpoint
        n = min(o.fuse_samples, job.calib_ids.shape[0])
        cfg = dataclasses.replace(job.config, method="fusegpt", blocks=list(plan), remove=len(plan), sparsity=None,
                                  nsamples=n, score_samples=min(job.config.score_samples, n), epochs=o.fuse_epochs,
                                  final_epochs=0, mode="oneshot", offload="cpu")
        sub = Job(adapter=ad, runner=runner, config=cfg, calib_ids=job.calib_ids[:n],
                  generator=torch.Generator().manual_seed(cfg.seed), num_removals=len(plan), quiet=True)
        try:
            steps = fuse_and_remove(sub, receivers="local", selection=FixedPlan(plan))
        finally:
            sub.close()
        # every block before the first one the fusion touched is the dense model's: start from its cached input
        g0 = min(min([s.removed, *s.group]) for s in steps)
        m0 = runner.macs
        h = runner.run(list(ad.blocks)[g0:], ad.block_kinds()[g0:], self.cache.get(g0))
        out = self._kl(h, 0)
        fl = sum(sub.flops.values()) + 2 * (runner.macs - m0)
        job.flops["search"] = job.flops.get("search", 0.0) + fl
        del model, sub
        return out


# ---- the search -----------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """What a search found and what it cost. Block indices are the original model's."""

    fitness: str
    num_blocks: int
    k: int
    windows: int
    heldout: bool  # fitness on held-out windows (False: on the scoring windows, when none were given)
    seed: list[int]  # the MI-greedy set the population starts from
    seed_fitness: float
    best: list[int]  # sorted
    best_fitness: float
    order: list[int]  # the best set in the fusion order (ascending seed score)
    scores: dict[int, float]  # the seed scores (MI by default) of every block
    generations: list[dict[str, Any]] = field(default_factory=list)  # per generation: best so far, parent, cost
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every fitness lookup, in order
    seconds: float = 0.0  # this process's wall time (a resumed search: less than the first attempt's)
    fitness_seconds: float = 0.0  # summed seconds of every distinct evaluation, replayed ones included
    distinct: int = 0  # distinct block sets evaluated
    computed: int = 0  # evaluations computed by this process (0 when a resumed search replayed every one)
    compute_dtype: str | None = None
    flops: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        keys = ("fitness", "windows", "heldout", "seed", "seed_fitness", "best", "best_fitness", "seconds",
                "fitness_seconds", "distinct", "computed")
        out = {k: getattr(self, k) for k in keys}
        out["best_per_generation"] = [g["best_fitness"] for g in self.generations]
        return out


def search_blocks(job: Job, kind: str, *, records: RecordLog | None = None) -> SearchResult:
    """Search the ``job.num_removals`` blocks to remove (module docstring); the model is left unchanged."""
    t0 = time.perf_counter()
    cfg, o = job.config, job.config.method_options("search")
    L, k = job.adapter.num_blocks, job.num_removals
    ids = job.heldout_ids
    heldout = ids is not None and ids.shape[0] > 0
    if not heldout:
        ids = job.calib_ids[: cfg.score_samples]
        log.warning("search: no held-out windows were given; the fitness is measured on the %d scoring windows",
                    ids.shape[0])
    ids = ids[: o.fitness_samples]
    score_ids = job.calib_ids[: cfg.score_samples]
    sec: dict[str, float] = {}
    with job.measure("scoring", sec):
        s = ORDERS[cfg.order](job.cache("score", score_ids), score_ids, f"search: {cfg.order} scores")
    scores = dict(enumerate(s))
    seed = tuple(sorted(pick_blocks(scores, k, min_gap=cfg.min_gap)))
    fit = Fitness(job, ids, kind, o, scores, records)
    rng = random.Random(cfg.seed)
    schedule = stage_schedule(o.offspring, fit.windows, stages_for(kind, o.stages))
    evals: list[dict[str, Any]] = []

    def measure(blocks: tuple[int, ...], n: int, gen: int, stage: int) -> float:
        cached = len(fit.values.get(blocks, [])) >= min(n, fit.windows)
        before = fit.seconds.get(blocks, 0.0)
        v = fit(blocks, n)
        evals.append({"generation": gen, "stage": stage, "blocks": list(blocks), "windows": min(n, fit.windows),
                      "fitness": v, "cached": cached, "seconds": fit.seconds.get(blocks, 0.0) - before})
        return v

    bar = tqdm(total=o.generations + 1, desc=f"search ({kind} fitness)", unit="gen", leave=False)
    parent = seed
    parent_fit = measure(parent, fit.windows, 0, -1)
    bar.update(1)
    bar.set_postfix(best=f"{parent_fit:.4g}")
    seed_fit = parent_fit
    gens = [{"generation": 0, "best": list(parent), "best_fitness": parent_fit, "accepted": True,
             "seconds": time.perf_counter() - t0}]
    log.info("search (%s): seed %s, fitness %.5f; %d generations x %d offspring, stages %s", kind, list(seed),
             parent_fit, o.generations, o.offspring, schedule)
    for gen in range(1, o.generations + 1):
        tg = time.perf_counter()
        children: list[tuple[int, ...]] = []
        for _ in range(50 * o.offspring):
            if len(children) == o.offspring:
                break
            c = mutate(parent, L, rng, o.max_swaps)
            if c != parent and c not in children:
                children.append(c)
        for stage, (n, keep) in enumerate(schedule):
            ranked = sorted(children, key=lambda c: (measure(c, n, gen, stage), c))
            children = ranked[:keep]
        best = children[0]
        best_fit = fit(best)  # measured on every window by the last stage
        accepted = best_fit < parent_fit
        if accepted:
            parent, parent_fit = best, best_fit
        gens.append({"generation": gen, "best": list(parent), "best_fitness": parent_fit, "accepted": accepted,
                     "candidate": list(best), "candidate_fitness": best_fit, "seconds": time.perf_counter() - tg})
        log.info("search generation %d/%d: best child %.5f (%s), parent %.5f %s", gen, o.generations, best_fit,
                 list(best), parent_fit, "(replaced)" if accepted else "")
        bar.update(1)
        bar.set_postfix(best=f"{parent_fit:.4g}")
    bar.close()
    job.state.caches.pop("fitness").close()
    order = sorted(parent, key=lambda b: (scores[b], b))
    res = SearchResult(fitness=kind, num_blocks=L, k=k, windows=fit.windows, heldout=heldout, seed=list(seed),
                       seed_fitness=seed_fit, best=list(parent), best_fitness=parent_fit, order=order, scores=scores,
                       generations=gens, evaluations=evals, seconds=time.perf_counter() - t0,
                       fitness_seconds=sum(fit.seconds.values()), distinct=len(fit.values),
                       computed=fit.computed)
    if records is not None and is_main():
        records.append({"result": res.summary() | {"order": order}})
    return res


# ---- the methods --------------------------------------------------------------------------------------------------
def fitness_windows(config) -> int:
    """Held-out windows a search method asks the calibration sampler for."""
    return config.method_options("search").fitness_samples


def _records(job: Job) -> RecordLog | None:
    return None if job.checkpoint is None else RecordLog(job.checkpoint.folder / "search.jsonl")


def _searched(job: Job, kind: str) -> tuple[list[int], dict[str, Any], dict[int, float] | None]:
    """(removal order, search summary, seed scores): searched now, or read back when a resumed run has finished
    steps (the model is no longer dense, so its search is the one on record)."""
    records = _records(job)
    if job.state.steps:
        done = [r["result"] for r in (records.read() if records is not None else []) if "result" in r]
        if not done:
            raise RuntimeError("this resumed run has removal steps but no finished search on record; start it again "
                               "without --resume")
        return done[-1]["order"], done[-1], job.state.steps[0].scores
    res = search_blocks(job, kind, records=records)
    return res.order, res.summary(), res.scores


@register_method("evopress", kind="drop", options="search", streams=True, heldout=fitness_windows,
                 summary="EvoPress-style evolutionary search of the removal set (KL of plain removal), MI-seeded")
def run_evopress(job: Job) -> list[StepReport]:
    order, summary, scores = _searched(job, "drop")
    return remove_plan(job, order, scores=scores, seconds={"search": summary["seconds"]}, extra={"search": summary})


@register_method("fusegpt-evo", kind="fuse", options="search", heldout=fitness_windows,
                 summary="FuseGPT-Evo: MI-seeded evolutionary search (KL after a cheap fusion), then full fusion")
def run_fusegpt_evo(job: Job) -> list[StepReport]:
    kind = job.config.method_options("search").fitness
    order, summary, scores = _searched(job, kind)
    steps = fuse_and_remove(job, receivers="local", selection=_Searched(order, scores))
    steps[0].extra["search"] = summary
    steps[0].seconds["search"] = summary["seconds"]
    return steps


class _Searched(FixedPlan):
    """The searched order; step 0 reports the seed scores (the score map of the report)."""

    def __init__(self, blocks: list[int], scores: dict[int, float] | None) -> None:
        super().__init__(blocks)
        self.scores = scores

    def choose(self, job, step, sec):
        return job.state.current(self.blocks[step]), (self.scores if step == 0 else None)

