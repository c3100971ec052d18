"""Selection-metric study (the paper's Tables 17 and 18, on our model): per block, what every selection metric says
about it on the dense model, and what removing that one block costs with plain removal and after a cheap fusion;
then how well each metric predicts those costs (Pearson and Spearman correlations with p-values).

    python benchmarks/metric_study.py --out docs/results/metrics/rows.jsonl --threads 2      # measure (resumable)
    python benchmarks/metric_study.py --table docs/results/metrics/rows.jsonl                # print the tables

Metrics (dense model, the first --score-samples calibration windows; higher = more important): random (seeded),
Block Influence (ShortGPT), skip-one NLL (SLEB's / Shortened LLaMA's PPL criterion), empirical Fisher (squared
per-sequence gradients), Macro Influence. Costs of each single block: WikiText-2 test PPL (--eval-windows windows)
and next-token KL from the dense model on held-out calibration windows (no token shared with the calibration
windows), after plain removal and after fusing the block with `fusegpt --blocks i` at a cheap budget
(--fuse-samples windows x --fuse-epochs, the cpu preset otherwise). Recoverability = log PPL(removal) - log
PPL(fused): what fusion wins back.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

METRICS = ("random", "bi", "nll", "fisher", "mi")
NAMES = {"random": "random", "bi": "Block Influence", "nll": "skip-one NLL (SLEB/PPL)", "fisher": "Fisher",
         "mi": "Macro Influence"}
TARGETS = {"drop_logppl": "log PPL, plain removal", "drop_kl": "KL, plain removal",
           "fuse_logppl": "log PPL, fused", "fuse_kl": "KL, fused", "recover": "recoverability (log PPL won back)"}


@torch.no_grad()
def _kl(model, ids: torch.Tensor, ref_logp: torch.Tensor, batch: int = 2) -> float:
    total = 0.0
    for s in range(0, ids.shape[0], batch):
        lp = torch.log_softmax(model(input_ids=ids[s : s + batch], use_cache=False).logits.float(), -1)
        total += float(torch.nn.functional.kl_div(lp, ref_logp[s : s + batch], reduction="sum", log_target=True))
    return total / ids[:, :].numel()


def measure(args) -> None:
    import copy

    from fusegpt.activations import ActivationCache, Runner
    from fusegpt.adapters import get_adapter
    from fusegpt.api import calibration_windows, compress
    from fusegpt.config import CompressConfig
    from fusegpt.evaluate.perplexity import nll_sum, perplexity_windows
    from fusegpt.export import drop_blocks
    from fusegpt.fusion import merge_fused_linears
    from fusegpt.models import load_model
    from fusegpt.scoring import (block_influence_scores, fisher_scores, macro_influence_scores, skip_nll_scores)

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    dense, tok = loaded.model, loaded.tokenizer
    cfg = CompressConfig.from_preset("cpu", remove=1, sparsity=None, compute_dtype="fp32", device="cpu",
                                     seqlen=args.seqlen, nsamples=max(args.fuse_samples, 8),
                                     score_samples=min(8, args.fuse_samples), group_size=min(7, args.group_size),
                                     final_nsamples=0)  # the rows after --nsamples are the held-out windows
    calib = calibration_windows(tok, cfg, heldout=args.heldout)
    train, held = calib[: cfg.nsamples], calib[cfg.nsamples :]
    score = train[: cfg.score_samples]
    windows = perplexity_windows(tok, "wikitext2", args.seqlen, args.eval_windows)
    earlier = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()] if args.out.exists() else []
    done = {r["block"]: r for r in earlier if "block" in r}
    head = next((r for r in earlier if "metrics" in r), None)
    ad = get_adapter(dense)
    L = ad.num_blocks
    if head is None:
        t = time.perf_counter()
        runner = Runner.for_model(ad, cfg.seqlen, device=torch.device("cpu"), batch_size=cfg.batch_size)
        cache = ActivationCache(runner, score)
        metrics = {"mi": macro_influence_scores(cache, desc="MI"), "bi": block_influence_scores(cache),
                   "nll": skip_nll_scores(cache, score, desc="skip-one NLL"), "fisher": fisher_scores(runner, score),
                   "random": torch.rand(L, generator=torch.Generator().manual_seed(args.seed)).tolist()}
        cache.close()
        nll, n = nll_sum(dense, windows, desc="dense PPL")
        head = {"metrics": metrics, "dense_ppl": math.exp(nll / n), "seconds": time.perf_counter() - t,
                "model": args.model, "score_samples": cfg.score_samples, "heldout": held.shape[0],
                "eval_windows": windows.shape[0], "fuse_samples": args.fuse_samples, "fuse_epochs": args.fuse_epochs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(head) + "\n")
    with torch.no_grad():
        ref = torch.cat([torch.log_softmax(dense(input_ids=held[s : s + 2], use_cache=False).logits.float(), -1)
                         for s in range(0, held.shape[0], 2)])
    for b in range(L):
        if b in done:
            continue
        t = time.perf_counter()
        row = {"block": b, **{m: head["metrics"][m][b] for m in METRICS}}
        model = copy.deepcopy(dense)
        drop_blocks(model, [b])
        nll, n = nll_sum(model, windows, desc=None)
        row.update(drop_ppl=math.exp(nll / n), drop_kl=_kl(model, held, ref))
        model = copy.deepcopy(dense)
        fcfg = CompressConfig.from_preset("cpu", blocks=[b], nsamples=args.fuse_samples,
                                          score_samples=min(cfg.score_samples, args.fuse_samples),
                                          epochs=args.fuse_epochs, compute_dtype="fp32", device="cpu",
                                          seqlen=args.seqlen, group_size=cfg.group_size,
                                          final_nsamples=0)  # the final stage on the same --fuse-samples windows
        rep = compress(model, fcfg, calib_ids=train[: args.fuse_samples])
        for m in model.modules():
            merge_fused_linears(m)
        nll, n = nll_sum(model, windows, desc=None)
        row.update(fuse_ppl=math.exp(nll / n), fuse_kl=_kl(model, held, ref), fuse_seconds=rep.seconds,
                   train_steps=sum(s.train_steps for s in rep.steps), seconds=time.perf_counter() - t)
        print(f"block {b}: removal PPL {row['drop_ppl']:.2f} KL {row['drop_kl']:.4f}; fused PPL {row['fuse_ppl']:.2f} "
              f"KL {row['fuse_kl']:.4f} ({row['seconds']:.0f} s)", flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        del model


def table(path: Path) -> str:
    from scipy import stats

    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    head = next(r for r in lines if "metrics" in r)
    rows = sorted((r for r in lines if "block" in r), key=lambda r: r["block"])
    for r in rows:
        r["drop_logppl"], r["fuse_logppl"] = math.log(r["drop_ppl"]), math.log(r["fuse_ppl"])
        r["recover"] = r["drop_logppl"] - r["fuse_logppl"]
    out = [f"{head['model']}: dense WikiText-2 PPL {head['dense_ppl']:.2f} ({head['eval_windows']} windows); "
           f"metrics on {head['score_samples']} calibration windows; KL on {head['heldout']} held-out windows; "
           f"cheap fusion {head['fuse_samples']} windows x {head['fuse_epochs']} epochs; {len(rows)} blocks", ""]
    out.append("| block | MI | BI | skip-one NLL | Fisher | removal PPL | removal KL | fused PPL | fused KL | "
               "recoverability |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['block']} | {r['mi']:.4f} | {r['bi']:.4f} | {r['nll']:.4f} | {r['fisher']:.3g} | "
                   f"{r['drop_ppl']:.2f} | {r['drop_kl']:.4f} | {r['fuse_ppl']:.2f} | {r['fuse_kl']:.4f} | "
                   f"{r['recover']:.4f} |")
    out += ["", "Correlation of each metric (dense model) with each single-block cost, over the blocks: Pearson r (p) "
                "/ Spearman rho (p). A metric that predicts well correlates positively with the costs.", ""]
    out.append("| metric | " + " | ".join(TARGETS.values()) + " |")
    out.append("|---|" + "---|" * len(TARGETS))
    for m in METRICS:
        x = [r[m] for r in rows]
        cells = []
        for t in TARGETS:
            y = [r[t] for r in rows]
            pr, pp = stats.pearsonr(x, y)
            sr, sp = stats.spearmanr(x, y)
            cells.append(f"{pr:+.2f} ({pp:.1g}) / {sr:+.2f} ({sp:.1g})")
        out.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, help="rows (JSONL, appended; an interrupted run resumes)")
    ap.add_argument("--table", type=Path, help="print the tables of a finished rows file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=8, help="held-out calibration windows for the KL (default 8)")
    ap.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows for PPL (default 16)")
    ap.add_argument("--fuse-samples", type=int, default=16, help="calibration windows of the cheap fusion")
    ap.add_argument("--fuse-epochs", type=int, default=2, help="epochs of the cheap fusion")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random metric")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    ap.add_argument("--group-size", type=int, default=7, help="receiving blocks of the fusion (default 7, cpu preset)")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if not args.out:
        ap.error("--out or --table")
    import logging

    logging.basicConfig(level=logging.WARNING)
    measure(args)
    print(table(args.out))


if __name__ == "__main__":
    main()
