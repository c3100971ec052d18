"""What a compression run will cost, before it runs: time per removal and in total, peak memory, cache disk.

No weights are loaded. The model's config gives its shapes; a two-block model of the same shapes (vocabulary cut
to 128 tokens: embeddings do not enter the block loop) is built with random weights on the compute device and
timed: one block's forward on a mini-batch of calibration windows, the same block with a donor injected (forward,
and one distillation step: forward, backward, Adam). The run's loop is then counted in those units, step by
step, as `fusegpt.methods.fusegpt` runs it (docs/METHOD.md, "Plan"):

- scoring (every step in iterative mode, the first in one-shot): the full pass and, for each of the L current
  blocks, the blocks after it: L (L - 1) / 2 + L block forwards over S windows;
- the group input from the activation cache: on the first step, the blocks before the group (taken as the middle
  of the model, (L - G) / 2, since MI has not chosen yet); later steps start from a cache checkpoint, at most
  ceil(L / (R - 1)) - 1 blocks back, half that on average;
- the teacher: G + 1 plain block forwards over N windows (``--target dense``: instead, the dense model's L block
  forwards over N windows once, before the first removal);
- the group loss before and after training: 2 x G fused forwards over S windows (the configured loss and the MSE
  from the same forward);
- training: epochs x ceil(N / B) steps of G fused blocks (forward, backward and optimizer);
- the final stage (``--final-epochs``): final_epochs x ceil(N_f / B) steps (N_f = ``--final-nsamples`` or N; the
  dense targets of its windows beyond N: L forwards each, counted as teacher) of the L - k remaining blocks with LoRA
  (one LoRA block's step measured), plus the LM head of the logit KL (student forward and input gradient, teacher
  forward: 3 head forwards per step, counted as head / block multiply-accumulates x one block's forward), and the
  calibration NLL before and after (L - k blocks and the head over S windows, twice).

Memory is the formula of ``fusegpt.memory`` on top of a baseline: this process's own resident memory (Python,
torch, transformers, as a compress process has them) plus the model's weights (fp32, or none with offload disk).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .distill.losses import head_passes
from .fusion.math import HALF_DTYPES

__all__ = ["PlanReport", "plan_run", "format_plan", "fit_offload", "offload_decision"]


@dataclass
class PlanReport:
    model: str
    device: str
    compute_dtype: str
    blocks: int
    removals: int
    params: int
    timings: dict[str, float]  # measured seconds per unit (one mini-batch through one block)
    phases: dict[str, float]  # predicted seconds per phase, whole run
    seconds_per_step: list[float]
    seconds_total: float
    baseline_bytes: int
    memory: dict[str, Any]
    peak_bytes: int
    cache_disk_bytes: int
    grad_checkpoint: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    from .device import synchronize

    fn()  # warm-up (allocations, kernels)
    synchronize(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _two_block_model(config):
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.num_hidden_layers = 2
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:2])
    text.vocab_size = 128
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= 128:
            setattr(text, key, 0)
    with torch.random.fork_rng(devices=[]):  # the caller's (compress's) global generator stays as it was
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


def measure_units(config, cfg, device: torch.device, compute: torch.dtype | None, grad_checkpoint: bool,
                  repeats: int = 3, train_batch: int | None = None,
                  final_checkpoint: bool | None = None) -> dict[str, float]:
    """Seconds of one mini-batch (``cfg.batch_size`` windows of ``cfg.seqlen`` tokens) through one block: plain
    forward, fused forward, and one fused distillation step (forward + backward + Adam) on ``train_batch`` of
    those windows (default all; a data-parallel rank's share). For a run with a final stage (``final_checkpoint``
    not None: its checkpointing) also one LoRA block's step and the LM head's forward."""
    from .activations import Runner
    from .adapters import get_adapter
    from .attention import cpu_training_attention
    from .distill import get_loss
    from .fusion import fused_linears, inject_donor
    from .methods.fusegpt import param_groups
    from .models import weight_dtype

    wdt = weight_dtype(cfg.dtype, compute)  # the run's weights (--dtype auto: the compute dtype where half)
    model = _two_block_model(config).to(device, dtype=wdt)
    for p in model.parameters():
        p.requires_grad_(False)
    ad = get_adapter(model)
    runner = Runner.for_model(ad, cfg.seqlen, device=device, batch_size=cfg.batch_size, compute_dtype=compute)
    runner.grad_checkpoint = grad_checkpoint
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, cfg.seqlen, text.hidden_size, generator=g).to(wdt)
    units = {"block_forward": _median_time(lambda: runner.run([blocks[0]], kinds[:1], x), repeats, device)}
    if final_checkpoint is not None:  # the LM head's forward over a mini-batch, scaled from the block's by MACs
        units["head_forward"] = (text.hidden_size * text.vocab_size / ad.block_macs_per_token(blocks[0], cfg.seqlen)
                                 * units["block_forward"])
    inject_donor(ad, blocks[1], [blocks[0]], coef_kind=cfg.coef, coef_rank=cfg.coef_rank,
                 lora_rank=cfg.group_lora_rank, generator=g)
    for _, fl in fused_linears(blocks[0]):
        fl.checkpoint = grad_checkpoint
    units["fused_forward"] = _median_time(lambda: runner.run([blocks[0]], kinds[:1], x), repeats, device)
    groups = param_groups([blocks[0]], cfg.train, cfg.coef_lr, cfg.lr)
    params = [p for grp in groups for p in grp.params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": grp.params, "lr": grp.lr} for grp in groups], betas=tuple(cfg.betas))
    loss_fn = get_loss(cfg.loss) if cfg.loss == "mse" else get_loss("mse")
    xd = x[: train_batch or cfg.batch_size].to(device)
    yd = xd.clone()

    def step():
        out = runner.forward_blocks([blocks[0]], kinds[:1], xd)
        loss = loss_fn(out, yd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with cpu_training_attention():  # as train_group runs its steps
        units["train_step"] = _median_time(step, repeats, device)
    if final_checkpoint is not None:  # the final stage trains plain blocks with LoRA + norms
        from .fusion import wrap_block

        lora = []
        for fl in wrap_block(ad, blocks[1], lora_rank=cfg.final_rank, generator=g).values():
            lora += fl.lora_parameters()
        lora += [p for n, p in blocks[1].named_parameters() if "norm" in n]
        for p in lora:
            p.requires_grad_(True)
        opt2 = torch.optim.Adam(lora, lr=cfg.final_lr, betas=tuple(cfg.betas))
        runner.grad_checkpoint = final_checkpoint

        def lora_step():
            out = runner.forward_blocks([blocks[1]], kinds[1:2], xd)
            loss = loss_fn(out, yd)
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            opt2.step()

        with cpu_training_attention():
            units["lora_step"] = _median_time(lora_step, repeats, device)
    return units


def plan_run(model_name: str, config, *, device: str | None = None, repeats: int = 3, nproc: int = 1,
             compute_dtype: torch.dtype | None = None) -> PlanReport:
    """Predict the cost of ``fusegpt compress model_name`` with ``config`` (nothing is loaded but the config).
    ``compute_dtype``: the run's dtype when the caller decided it (``torch.float32`` = no autocast), else decided
    here from ``config.compute_dtype``.
    ``nproc``: data-parallel processes (torchrun; ``fusegpt.distributed``): the scoring sweep's candidates and each
    mini-batch are split over them (a mini-batch of B / nproc windows is timed), the rest runs on every one."""
    from transformers import AutoModelForCausalLM

    from .adapters import check_supported, get_adapter
    from .api import _autocast_dtype, _memory_plan, available_for_run, check_mini_batches
    from .config import num_removals
    from .device import current_rss_bytes, resolve_device
    from .models import inspect_model, weight_dtype

    info = inspect_model(model_name, weights=False)
    check_supported(info.config)
    config.validate(info.num_blocks, info.max_positions)
    dev = resolve_device(device or config.device)
    compute = _autocast_dtype(config, dev, compute_dtype)
    L0, k = info.num_blocks, num_removals(config, info.num_blocks)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(info.config)
    params = sum(p.numel() for p in skeleton.parameters())
    # the weights are not loaded yet: what --grad-checkpoint auto weighs is what is left once they are
    loading = 0 if config.offload == "disk" else params * weight_dtype(config.dtype, compute).itemsize
    mem = _memory_plan(get_adapter(skeleton), config, compute, available_for_run(dev, loading=loading, nproc=nproc))
    check_mini_batches(config, nproc)  # the plan counts every method as FuseGPT's loop, so it checks them all
    # a rank's distillation step runs B / nproc windows
    units = measure_units(info.config, config, dev, compute, mem.grad_checkpoint, repeats,
                          train_batch=config.batch_size // nproc,
                          final_checkpoint=mem.final_checkpoint if mem.final else None)

    n_b = math.ceil(config.nsamples / config.batch_size)  # mini-batches over the calibration windows
    s_b = math.ceil(config.score_samples / config.batch_size)
    G = config.group_size
    R = config.cache_entries or None
    losses = 2  # before and after training (the loss and the MSE from one forward)
    phases = {"scoring": 0.0, "group_input": 0.0, "teacher": 0.0, "eval": 0.0, "train": 0.0}
    per_step = []
    for step in range(k):
        L = L0 - step
        before = dict(phases)
        if config.mode == "iterative" or step == 0:
            # the full pass on every rank; the L candidates' sweeps split over the ranks
            phases["scoring"] += (L + L * (L - 1) / 2 / nproc) * s_b * units["block_forward"]
        back = (L - G) / 2 if step == 0 else (
            min((L - G) / 2, (math.ceil(L / (R - 1)) - 1) / 2) if R else 0.0)
        phases["group_input"] += max(back, 0.0) * n_b * units["block_forward"]
        if config.target != "dense":
            phases["teacher"] += (G + 1) * n_b * units["block_forward"]
        elif step == 0:  # the dense model's hidden states, once
            phases["teacher"] += L0 * n_b * units["block_forward"]
        phases["eval"] += losses * G * s_b * units["fused_forward"]
        phases["train"] += config.epochs * n_b * G * units["train_step"]
        per_step.append(sum(phases.values()) - sum(before.values()))
    if mem.final:  # the memory plan has a final stage exactly when the run does
        F, head = L0 - k, units["head_forward"]
        # head forwards per trained token of the final stage's loss (a top-k teacher: its head once, not every step)
        # per step, on the --final-positions fraction of its tokens
        passes = (head_passes(config.final_loss) - (config.final_topk > 0)) * config.final_positions
        # its mini-batches of --final-batch-size windows; a step's time taken as proportional to its windows
        n_f = math.ceil((config.final_nsamples or config.nsamples) / config.final_batch)
        scale = config.final_batch / config.batch_size
        extra = math.ceil((config.final_nsamples or config.nsamples) / config.batch_size) - n_b
        phases["teacher"] += L0 * max(extra, 0) * units["block_forward"]  # its extra windows' dense targets
        phases["final"] = (config.final_epochs * n_f * scale * (F * units["lora_step"] + passes * head)
                           + 2 * s_b * (F * units["block_forward"] + head)
                           + (n_f * scale * head if config.final_topk else 0.0))
        per_step[-1] += phases["final"]
    model_bytes = 0 if config.offload == "disk" else loading
    notes = [f"{config.method}: counted as FuseGPT's loop (scoring, group input, teacher, group losses, training)"]
    search = _search_seconds(config, units, L0, k, s_b, params)
    memory = mem.to_dict()
    if search is not None:
        phases["search"], copy_bytes, note = search
        per_step[0] += phases["search"]
        if copy_bytes:  # fitness = fuse: each candidate is fused on a copy of the model
            memory["search_model_copy"] = copy_bytes
            memory["total"] += copy_bytes
        notes.append(note)
    baseline = current_rss_bytes() + model_bytes
    if nproc > 1:
        notes.append(f"{nproc} processes: the time is per process (all run at once); the memory is per process; "
                     f"gradient all-reduce time is not counted")
    if config.method not in ("fusegpt", "fusegpt-global", "fusegpt-evo"):
        notes.append("other methods are not counted step by step: the time is FuseGPT's with the same config")
    cache_disk = config.nsamples * config.seqlen * (info.config.get_text_config().hidden_size if hasattr(
        info.config, "get_text_config") else info.config.hidden_size) * (
        2 if compute in HALF_DTYPES and config.cache_dtype == "auto" else 4)
    return PlanReport(
        model=model_name, device=str(dev), compute_dtype=str(compute or torch.float32), blocks=L0, removals=k,
        params=params, timings=units, phases=phases, seconds_per_step=per_step, seconds_total=sum(per_step),
        baseline_bytes=baseline, memory=memory, peak_bytes=baseline + memory["total"],
        cache_disk_bytes=cache_disk * (R or L0) if config.offload == "disk" else 0,
        grad_checkpoint=mem.grad_checkpoint, notes=notes,
    )


def offload_decision(config, *, weights: int, need: int, available: int | None, device: torch.device,
                     streams: bool):
    """``config`` as it can run in ``available`` bytes, and why it changed (None: unchanged).

    ``weights``: the model's weight bytes; ``need``: what the run needs where its weights live (the weights and the
    memory formula's working set; on an accelerator the activation cache waits in host memory and is not counted).
    A model that does not fit is not loaded whole: its blocks stay in the checkpoint and are loaded one at a time
    (``--offload disk``, the streaming engine), with the preset's final stage off (it trains every block at once).
    What cannot stream is refused with the numbers and the ways out (ConfigError), before anything is loaded."""
    import dataclasses

    from .config import PRESETS, ConfigError

    if config.offload == "disk" or available is None or need <= available:
        return config, None
    gib = 2**30
    what = (f"the model's weights ({weights / gib:.2f} GiB) and the run's working memory "
            f"({(need - weights) / gib:.2f} GiB) do not fit the {available / gib:.2f} GiB available on {device}")
    if not streams:
        raise ConfigError(f"{what}, and {config.method} needs every block's weights at once: use a device with more "
                          "memory, --dtype bf16 (half the weights), or a method that streams its blocks "
                          "(--offload disk; `fusegpt methods` lists them)")
    if config.order == "fisher":
        raise ConfigError(f"{what}, and --order fisher needs every block's weights at once (a full backward pass): "
                          "use another --order, so that the blocks can stream from disk (--offload disk)")
    changes, note = {"offload": "disk"}, ""
    from .api import has_final_stage

    if has_final_stage(config):
        if "final_epochs" in config.overrides or not PRESETS.get(config.preset or "", {}).get("final_epochs"):
            raise ConfigError(f"{what}; its blocks could stream from disk (--offload disk), but --final-epochs trains "
                              "every block at once: pass --final-epochs 0, or use a device with more memory")
        changes["final_epochs"] = 0
        note = f"; the {config.preset} preset's final stage is off (it trains every block at once)"
    new = dataclasses.replace(config, **changes)
    new.validate()
    return new, (f"{what}: its blocks stay in the checkpoint and are loaded one at a time (--offload disk){note}. "
                 "Pass --offload disk to choose this yourself (a resumed run must make the same choice)")


def fit_offload(model_name: str, config, *, nproc: int = 1, compute_dtype: torch.dtype | None = None, info=None):
    """:func:`offload_decision` for ``fusegpt compress model_name`` (nothing loaded but the config): the weights in
    ``--dtype`` against what ``--device`` has available for one of ``nproc`` processes. ``info``: the model's
    :class:`fusegpt.models.ModelInfo` when the caller has read it already (``preflight``)."""
    from transformers import AutoModelForCausalLM

    from .adapters import get_adapter
    from .api import _autocast_dtype, _memory_plan, available_for_run
    from .device import resolve_device
    from .distributed import smallest_over_ranks
    from .methods import method_info
    from .models import inspect_model, weight_dtype

    if config.offload == "disk":
        return config, None
    dev = resolve_device(config.device)
    # under torch.distributed every rank takes the same decision, for the rank with the least memory (a rank that
    # streamed while another did not would wait for it at the store's barrier)
    available = smallest_over_ranks(available_for_run(dev, nproc=nproc))
    if available is None:
        return config, None
    if info is None:
        info = inspect_model(model_name, weights=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(info.config)
    compute = _autocast_dtype(config, dev, compute_dtype)
    weights = sum(p.numel() for p in skeleton.parameters()) * weight_dtype(config.dtype, compute).itemsize
    mem = _memory_plan(get_adapter(skeleton), config, compute, max(0, available - weights), quiet=True)
    need = weights + mem.total - (mem.cache if dev.type != "cpu" else 0)
    return offload_decision(config, weights=weights, need=need, available=available, device=dev,
                            streams=method_info(config.method).streams)


def _search_seconds(config, units: dict[str, float], L: int, k: int, s_b: int, params: int):
    """(seconds, extra bytes, note) of the block-set search of evopress / fusegpt-evo before the removals (counted in
    the first step), or None for other methods. Seed scoring + candidates, in the same units (the LM head of the
    fitness is not counted)."""
    from .methods import method_info
    from .methods.search import stage_schedule, stages_for

    if method_info(config.method).options != "search":
        return None
    o = config.method_options("search")
    kind = "drop" if config.method == "evopress" else o.fitness
    B, F = config.batch_size, o.fitness_samples
    sec = (L + L * (L - 1) / 2) * s_b * units["block_forward"]  # the seed's scoring
    per_window = (L - k) / 2 * units["block_forward"] / B  # a candidate runs from its first removed block (~ middle)
    sec += F * L * units["block_forward"] / B  # the dense activations of the held-out windows
    if kind == "drop":
        windows, prev, n = F, 0, o.offspring
        for w, keep in stage_schedule(o.offspring, F, stages_for(kind, o.stages)):
            windows += o.generations * n * (w - prev)
            prev, n = w, keep
        sec += windows * per_window
        note = (f"search (drop fitness): {o.generations} generations x {o.offspring} offspring, at most "
                f"{windows} window evaluations (fewer when candidates repeat)")
        return sec, 0, note
    fb = math.ceil(min(o.fuse_samples, config.nsamples) / B)
    sb = math.ceil(min(config.score_samples, o.fuse_samples) / B)
    G = config.group_size
    losses = 2  # before and after training (the loss and the MSE from one forward)
    fuse = k * (o.fuse_epochs * fb * G * units["train_step"] + (G + 1) * fb * units["block_forward"]
                + losses * G * sb * units["fused_forward"] + (L - G) / 2 * fb * units["block_forward"])
    candidates = 1 + o.generations * o.offspring
    sec += candidates * (fuse + F * per_window)
    note = (f"search (fuse fitness): at most {candidates} candidates, each fused on a copy of the model "
            f"({k} removals x {o.fuse_epochs * fb} steps) then measured on {F} held-out windows; the copy's weights "
            "are counted in the memory")
    return sec, 4 * params, note


def format_plan(rep: PlanReport) -> str:
    gib = 2**30
    lines = [
        f"plan for {rep.model}: {rep.blocks} blocks, {rep.params / 1e6:.1f}M parameters, {rep.removals} removals, "
        f"{rep.device} ({rep.compute_dtype}), gradient checkpointing {'on' if rep.grad_checkpoint else 'off'}",
        "measured per mini-batch and block: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rep.timings.items()),
        f"predicted time: {rep.seconds_total:.0f} s in all ({rep.seconds_total / 3600:.2f} h), first step "
        f"{rep.seconds_per_step[0]:.0f} s, last {rep.seconds_per_step[-1]:.0f} s; by phase: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in rep.phases.items()),
        f"predicted peak memory: {rep.peak_bytes / gib:.2f} GiB = baseline {rep.baseline_bytes / gib:.2f} GiB "
        f"(process + weights) + {rep.memory['total'] / gib:.2f} GiB (cache {rep.memory['cache'] / gib:.2f}, "
        f"group {rep.memory['group'] / gib:.2f}, training {rep.memory['training'] / gib:.2f}"
        + (f", final stage {rep.memory['final'] / gib:.2f} with checkpointing "
           f"{'on' if rep.memory['final_checkpoint'] else 'off'}" if rep.memory.get("final") else "") + ")",
    ]
    if rep.cache_disk_bytes:
        lines.append(f"disk for the activation cache (--offload disk): {rep.cache_disk_bytes / gib:.2f} GiB")
    lines += [f"note: {n}" for n in rep.notes[1:]]
    return "\n".join(lines)
