"""The one verb: ``compress(model, config) -> CompressReport``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .activations import Runner, cache_dtype
from .adapters import check_supported, get_adapter
from .config import CompressConfig, ConfigError, num_removals
from .data import check_window_count, heldout_starts, load_text, sample_starts, tokenize_text
from .distill.losses import head_passes
from .device import (
    auto_dtype_override,
    available_memory_bytes,
    choose_compute_dtype,
    current_rss_bytes,
    heap_trimming,
    matmul_flops_per_second,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    reuse_large_allocations,
)
from .fusion.math import master_dtype
from .memory import MemoryEstimate, auto_checkpoint, estimate_memory, lora_params, trainable_params
from .methods import Job, StepReport, get_method, method_info
from .methods.fusegpt import dense_target_count
from .models import ModelInfo, inspect_model
from .report import versions

log = logging.getLogger(__name__)

__all__ = ["CompressReport", "compress", "calibration_windows", "preflight", "resolve_compute_dtype",
           "resolve_weight_dtype"]


@dataclass
class CompressReport:
    method: str
    config: dict[str, Any]
    original_layers: int
    final_layers: int
    removed: list[int]  # original block indices, in removal order
    kept: list[int]  # original indices of the blocks that remain, in order
    steps: list[StepReport]
    params_before: int
    params_after: int
    seconds: float
    compute_dtype: str
    flops: dict[str, float] = field(default_factory=dict)
    matmul_peak_flops: float | None = None
    flops_fraction_of_peak: float | None = None
    peak_memory_bytes: int | None = None
    versions: dict[str, str] = field(default_factory=versions)
    source_model: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    resumed_after_step: int = 0  # steps restored from a checkpoint (0 = an uninterrupted run)
    # baseline RSS at the start of compress, the formula's prediction over it (fusegpt.memory), the measured peak
    # (process peak RSS on the CPU, allocator peak on a GPU)
    memory: dict[str, Any] = field(default_factory=dict)
    # fusegpt plan's prediction made at the start of the run (time, peak memory) next to what was measured
    plan: dict[str, Any] = field(default_factory=dict)


def preflight(model_name: str, config: CompressConfig) -> ModelInfo:
    """Every check of a run that needs only the model's config and tokenizer, before any weight is loaded or any
    compute starts: the model source and its checkpoint files, the architecture, the method names, the config
    against the model (blocks, maximum context) and the calibration text against ``nsamples x seqlen``."""
    if config.compute_dtype == "auto":
        auto_dtype_override()
    info = inspect_model(model_name)
    check_supported(info.config)
    get_method(config.method)
    if config.offload == "disk" and not method_info(config.method).streams:
        from .methods import method_names

        ok = [m for m in method_names() if method_info(m).streams]
        raise ConfigError(f"--offload disk streams blocks from the checkpoint; {config.method} reads or changes "
                          f"weights outside the loaded blocks: use --offload cpu, or one of {', '.join(ok)}")
    config.validate(info.num_blocks, info.max_positions)
    _check_data_parallel(config)
    ids = tokenize_text(info.tokenizer, load_text(config.calib))
    extra = final_extra_windows(config)
    asked = (f"--nsamples {config.nsamples} + {extra} more for the final stage (--final-nsamples "
             f"{config.final_nsamples}; lower it or set it to 0)") if extra else None
    check_window_count(ids.numel(), config.nsamples + extra, config.seqlen, f"calibration source {config.calib!r}",
                       asked)
    heldout = method_info(config.method).heldout
    if heldout is not None:  # the held-out windows must fit next to the calibration windows
        g = torch.Generator().manual_seed(config.seed)
        heldout_starts(ids.numel(), heldout(config), config.seqlen, g,
                       sample_starts(ids.numel(), config.nsamples, config.seqlen, g))
    return info


def check_mini_batches(config: CompressConfig, nproc: int | None = None) -> None:
    """Refuse mini-batches that ``nproc`` processes (default: this run's) cannot split evenly: the group stage's
    (--batch-size over --nsamples) and, with a final stage, its own (--final-batch-size over its windows)."""
    from .distributed import check_divisible

    check_divisible(config.batch_size, config.nsamples, nproc)
    if config.final_epochs > 0:
        check_divisible(config.final_batch, config.final_nsamples or config.nsamples, nproc, what="--final-nsamples",
                        batch_what="--final-batch-size" if config.final_batch_size else "--batch-size")


def _check_data_parallel(config: CompressConfig) -> None:
    """Under torch.distributed, methods that train split every mini-batch over the processes: refuse uneven ones."""
    if method_info(config.method).kind in ("fuse", "heal"):
        check_mini_batches(config)


# the methods whose runs end with the final stage when --final-epochs > 0
FINAL_STAGE_METHODS = ("fusegpt", "fusegpt-global", "fusegpt-evo")


def has_final_stage(config: CompressConfig) -> bool:
    """Does this run end with the final stage (``--final-epochs`` > 0 on a method that has one)?"""
    return config.final_epochs > 0 and config.method in FINAL_STAGE_METHODS


def final_extra_windows(config: CompressConfig) -> int:
    """Calibration windows the final stage trains on beyond the group stage's ``nsamples`` (``--final-nsamples``;
    0 without a final stage)."""
    if not has_final_stage(config):
        return 0
    return max(0, config.final_nsamples - config.nsamples)


def calibration_windows(tokenizer, cfg: CompressConfig, heldout: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] seeded random windows of the calibration source; then the final stage's extra windows
    (``--final-nsamples`` beyond ``nsamples``, random like the first); then, with ``heldout`` > 0, that many rows of
    windows that share no token with the first ``nsamples`` (a search's fitness windows). The first ``nsamples`` rows
    are the same whatever the others are, and so are the held-out windows whatever the extra ones are."""
    ids = tokenize_text(tokenizer, load_text(cfg.calib))
    g = torch.Generator().manual_seed(cfg.seed)
    starts = sample_starts(ids.numel(), cfg.nsamples, cfg.seqlen, g)
    held = heldout_starts(ids.numel(), heldout, cfg.seqlen, g, starts) if heldout > 0 else []
    extra = final_extra_windows(cfg)
    more = sample_starts(ids.numel(), extra, cfg.seqlen, g) if extra else []
    return torch.stack([ids[s : s + cfg.seqlen] for s in starts + more + held])


def resolve_compute_dtype(config: CompressConfig, device: torch.device | None = None) -> torch.dtype:
    """The dtype a run computes in (``torch.float32``: no autocast): ``config.compute_dtype`` with ``auto`` decided
    on ``device`` (default: the config's) by :func:`fusegpt.device.choose_compute_dtype`. A run decides it once and
    hands it to the plan and to :func:`compress` (``auto`` may measure, and two measurements may disagree); under
    torch.distributed every rank takes rank 0's decision, so the processes cannot compute in different dtypes."""
    from .distributed import broadcast_from_main

    dt = choose_compute_dtype(resolve_device(config.device) if device is None else device, config.compute_dtype)
    dt = dt or torch.float32
    return broadcast_from_main(dt) if config.compute_dtype == "auto" else dt


def resolve_weight_dtype(config: CompressConfig, device: torch.device | None = None,
                         compute: torch.dtype | None = None) -> torch.dtype:
    """The dtype a run loads its weights in: ``config.dtype``, with ``auto`` = the compute dtype where that is
    half precision (``compute`` when the caller decided it, else :func:`resolve_compute_dtype` on ``device``)."""
    from .models import weight_dtype

    if config.dtype != "auto":
        return weight_dtype(config.dtype)
    return weight_dtype("auto", compute if compute is not None else resolve_compute_dtype(config, device))


def _autocast_dtype(config: CompressConfig, device: torch.device, decided: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a run (None: fp32, no autocast) for the runner and the plan: ``decided`` when the
    caller resolved it (:func:`resolve_compute_dtype`), else resolved here on ``device``."""
    dt = decided if decided is not None else resolve_compute_dtype(config, device)
    return None if dt == torch.float32 else dt


def _prepare_job(model, config: CompressConfig, *, tokenizer=None, calib_ids: torch.Tensor | None = None,
                 on_step: Callable[[StepReport], None] | None = None, store=None,
                 compute_dtype: torch.dtype | None = None) -> tuple[Job, dict[str, Any]]:
    """What compress and search share: the model on its device and frozen, the compute dtype (``compute_dtype``
    when the caller decided it, else :func:`resolve_compute_dtype`), the runner, the memory plan and the Job (with
    held-out windows when the method asks for them). Returns (job, setup facts)."""
    adapter = get_adapter(model)
    L0 = adapter.num_blocks
    config.validate(L0)
    _check_data_parallel(config)
    info = method_info(config.method)
    heldout = info.heldout(config) if info.heldout is not None else 0
    if calib_ids is None:
        if tokenizer is None:
            raise ValueError("compress and search need a tokenizer or calib_ids")
        calib_ids = calibration_windows(tokenizer, config, heldout=heldout)
    extra = final_extra_windows(config)
    rows = config.nsamples + extra + heldout
    if calib_ids.shape[0] < rows or calib_ids.shape[1] != config.seqlen:
        raise ValueError(f"calib_ids must be [>= {rows}, {config.seqlen}] (--nsamples {config.nsamples}, then "
                         f"{extra} more for --final-nsamples, then {heldout} held-out), got {tuple(calib_ids.shape)}; "
                         "api.calibration_windows(tokenizer, config, heldout) draws them")
    device = resolve_device(config.device)
    offloaded = any(p.is_meta for p in model.parameters())
    if offloaded and store is None:
        raise ValueError("the model's blocks are on the meta device: pass the BlockStore they stream from (store=)")
    if offloaded:
        _move_materialized(model, device)
        store.device = device  # the blocks load where they compute (a store made for the CPU would feed a GPU run)
    else:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    compute = _autocast_dtype(config, device, compute_dtype)
    stored = next(model.parameters()).dtype
    if compute is None and master_dtype(stored) != stored:
        # half-precision weights compute in their dtype (autocast), so fp32 masters and half weights mix safely
        compute = stored
    peak = matmul_flops_per_second(device, compute or torch.float32, repeats=10)
    log.info("compute dtype %s; measured matmul peak %.1f GFLOP/s", compute or torch.float32, peak / 1e9)
    runner = Runner.for_model(adapter, config.seqlen, device=device, offload=torch.device(config.offload_device),
                              batch_size=config.batch_size, compute_dtype=compute)
    params_before = sum(p.numel() for p in model.parameters())
    k = num_removals(config, L0)
    plan = _memory_plan(adapter, config, compute, available_for_run(device))
    runner.grad_checkpoint = plan.grad_checkpoint
    runner.store = store
    baseline = current_rss_bytes()
    job = Job(adapter=adapter, runner=runner, config=config, calib_ids=calib_ids[: config.nsamples],
              generator=torch.Generator().manual_seed(config.seed), num_removals=k, on_step=on_step,
              memory_plan=plan,
              heldout_ids=calib_ids[config.nsamples + extra : rows] if heldout else None,
              final_ids=_final_ids(config, calib_ids))
    return job, {"device": device, "compute": compute, "peak": peak, "num_blocks": L0,
                 "params_before": params_before, "baseline": baseline}


def compress(
    model,
    config: CompressConfig,
    *,
    tokenizer=None,
    calib_ids: torch.Tensor | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    source_model: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    source_fingerprint: str | None = None,
    store=None,
    compute_dtype: torch.dtype | None = None,
) -> CompressReport:
    """Compress ``model`` in place with ``config.method``; returns the report.

    Calibration windows come from ``calib_ids`` ([N, T]) or are sampled from ``config.calib`` with ``tokenizer``.
    Fused layers stay wrapped in the returned model until export (``fusegpt.export.export_model`` merges them).

    ``checkpoint_dir``: persist the run after every finished step (resumable methods); with ``resume``, continue
    the run recorded there (refused, naming the difference, when config, compute dtype, ``source_fingerprint``
    or calibration windows differ). ``store``: the :class:`fusegpt.offload.BlockStore` of a model loaded with its
    blocks on disk (``load_model(..., blocks_on_disk=True)``); blocks are then loaded only while used.
    ``compute_dtype``: the dtype the caller already decided (:func:`resolve_compute_dtype`; ``torch.float32`` = no
    autocast); default: decided here from ``config.compute_dtype``.
    """
    job, setup = _prepare_job(model, config, tokenizer=tokenizer, calib_ids=calib_ids, on_step=on_step, store=store,
                              compute_dtype=compute_dtype)
    adapter, plan = job.adapter, job.memory_plan
    device, compute, peak = setup["device"], setup["compute"], setup["peak"]
    L0, params_before, baseline = setup["num_blocks"], setup["params_before"], setup["baseline"]
    calib_ids = job.calib_ids
    resumed = 0
    if checkpoint_dir is not None and method_info(config.method).resumable:
        from .methods.checkpoint import Checkpoint

        job.checkpoint = Checkpoint(checkpoint_dir)
        settings = run_settings(config, calib_ids, L0, compute, source_fingerprint)
        job.checkpoint.start(settings, resume=resume)
        if resume:
            resumed = job.checkpoint.restore(job)
    elif resume:
        log.warning("%s does not resume mid-run (it takes minutes, not hours): starting it again", config.method)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # memory-bound runs (the ones gradient checkpointing is for, or the memory-first --offload disk) give freed
        # heap pages back between steps; small runs keep their speed
        bound = plan.grad_checkpoint or config.offload == "disk"
        stack.enter_context(heap_trimming(bound))
        # the others keep large freed blocks (the final stage's logits) for reuse instead of mapping them afresh
        stack.enter_context(reuse_large_allocations(not bound))
        if config.offload == "disk":
            job.work_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fusegpt-work-")))
        try:
            steps = get_method(config.method)(job)
        finally:
            job.close()
    seconds = time.perf_counter() - t0
    # the peak read again after the run, the faster reading kept: one taken in a slow moment of a shared machine
    # made a loop at 0.29 of an idle bf16 peak report 0.80 (docs/RESULTS.md, fourteenth session)
    again = matmul_flops_per_second(device, compute or torch.float32, repeats=10)
    if again > peak:
        log.info("matmul peak read again after the run: %.1f GFLOP/s (%.1f at the start)", again / 1e9, peak / 1e9)
        peak = again
    removed = [s.removed for s in steps]
    kept = [i for i in range(L0) if i not in set(removed)]
    total_flops = sum(job.flops.values())
    return CompressReport(
        method=config.method, config=config.to_dict(), original_layers=L0, final_layers=adapter.num_blocks,
        removed=removed, kept=kept, steps=steps, params_before=params_before,
        params_after=_merged_param_count(model), seconds=seconds, compute_dtype=str(compute or torch.float32),
        flops={**job.flops, "total": total_flops}, matmul_peak_flops=peak,
        flops_fraction_of_peak=(total_flops / seconds / peak) if seconds > 0 else None,
        peak_memory_bytes=peak_memory_bytes(device), source_model=source_model, resumed_after_step=resumed,
        memory={"baseline_rss_bytes": baseline, "bound_over_baseline": plan.to_dict(),
                "predicted_over_baseline": job.memory_predicted or plan.to_dict(),
                "predicted_peak_bytes": baseline + (job.memory_predicted or plan.to_dict())["total"],
                "bound_peak_bytes": baseline + plan.total, "measured_peak_bytes": peak_memory_bytes(device),
                "device": str(device)},
    )


def _move_materialized(model, device: torch.device) -> None:
    """Move every parameter and buffer that is not on ``meta`` (the offloaded blocks stay there)."""
    if device.type == "cpu":
        return
    from accelerate.utils import set_module_tensor_to_device

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_meta:
            set_module_tensor_to_device(model, name, device)


def available_for_run(device: torch.device, *, loading: int = 0, nproc: int | None = None) -> int | None:
    """Memory one rank's run can still take on ``device`` (``loading`` bytes of weights not yet loaded taken off);
    data-parallel ranks on the CPU share the host's (``nproc``, default the process group's size)."""
    avail = available_memory_bytes(device)
    if avail is None:
        return None
    if device.type == "cpu":
        if nproc is None:
            nproc = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        avail //= max(1, nproc)
    return max(0, avail - loading)


def _memory_plan(adapter, config: CompressConfig, compute: torch.dtype | None,
                 available: int | None = None, *, quiet: bool = False) -> MemoryEstimate:
    """The memory formula (fusegpt.memory) for this model and config; decides --grad-checkpoint auto (with
    ``available`` bytes of memory left for the run besides the model; None: on the saving alone)."""
    block = adapter.blocks[0]
    lins = [(m.out_features, m.in_features, m.bias is not None) for m in adapter.block_linears(block).values()]
    norms = sum(p.numel() for n, p in block.named_parameters() if "norm" in n)
    g = config.group_size if config.method != "fusegpt-global" else config.method_options("global").receivers
    stored = cache_dtype(config.cache_dtype, compute)
    text = adapter.config.get_text_config() if hasattr(adapter.config, "get_text_config") else adapter.config
    kw = dict(n=config.nsamples, s=config.score_samples, t=config.seqlen, hidden=text.hidden_size,
              intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
              heads=text.num_attention_heads, group=g,
              batch=config.batch_size, cache_entries=config.cache_entries or None,
              cache_bytes=torch.empty((), dtype=stored).element_size(), offload=config.offload,
              trainable=g * trainable_params(lins, norms, coef=config.coef, coef_rank=config.coef_rank,
                                             lora_rank=config.lora_rank, train=config.train),
              receiver_linear_params=g * sum(o * i for o, i, _ in lins), largest_linear=max(o * i for o, i, _ in lins),
              block_bytes=4 * sum(p.numel() for p in block.parameters()),
              targets=dense_target_count(config, adapter.num_blocks),
              head_vocab=(adapter.model.lm_head.out_features
                          if head_passes(config.loss, config.aux_loss, config.aux_weight) else 0),
              **_final_stage_sizes(adapter, config, lins, norms))
    off = estimate_memory(**kw, grad_checkpoint=False)
    with_ckpt = estimate_memory(**kw, grad_checkpoint=True)
    # auto: checkpoint a phase when it saves more than 1 GiB (activations, attention matrices and the fused weights'
    # temporaries of every student block; the last dominate on large models) and the phase would otherwise take more
    # than half the memory available: decided for the group loop and for the final stage (every remaining block at
    # once) each on its own memory
    on = config.grad_checkpoint == "on" or (config.grad_checkpoint == "auto" and auto_checkpoint(
        off.training - with_ckpt.training, off.cache + off.group + off.training, available))
    final_on = config.grad_checkpoint == "on" or (config.grad_checkpoint == "auto" and auto_checkpoint(
        off.final - with_ckpt.final, off.cache + off.final, available))
    plan = estimate_memory(**kw, grad_checkpoint=on, final_checkpoint=final_on)
    plan.inputs = {**kw, "grad_checkpoint": on, "final_checkpoint": final_on}
    log.log(logging.DEBUG if quiet else logging.INFO,
            "memory plan: %.2f GiB over the baseline (cache %.2f, group %.2f, training %.2f%s); gradient "
            "checkpointing %s%s", plan.total / 2**30, plan.cache / 2**30, plan.group / 2**30, plan.training / 2**30,
            f", final stage {plan.final / 2**30:.2f}" if plan.final else "", "on" if on else "off",
            f" (final stage: {'on' if final_on else 'off'})" if plan.final else "")
    return plan


def _final_ids(config: CompressConfig, calib_ids: torch.Tensor) -> torch.Tensor | None:
    """The final stage's windows when ``--final-nsamples`` differs from ``--nsamples`` (None: the same windows):
    the first ``final_nsamples`` rows, i.e. the group stage's windows and the extra ones drawn after them."""
    if not has_final_stage(config) or config.final_nsamples in (0, config.nsamples):
        return None
    return calib_ids[: config.final_nsamples]


def _final_stage_sizes(adapter, config: CompressConfig, lins: list[tuple[int, int, bool]],
                       norms: int) -> dict[str, int]:
    """The sizes the memory formula needs for the final stage (none when the run has none): ``lins`` / ``norms``
    are one block's linears and norm parameters, as for the group."""
    if not has_final_stage(config):
        return {}
    f = adapter.num_blocks - num_removals(config, adapter.num_blocks)
    return {"final_blocks": f, "final_trainable": f * (lora_params(lins, config.final_rank) + norms),
            "vocab": adapter.model.lm_head.out_features if head_passes(config.final_loss) else 0,
            "final_windows": config.final_nsamples or config.nsamples,
            "final_batch": config.final_batch, "final_topk": config.final_topk}


def run_settings(config: CompressConfig, calib_ids: torch.Tensor, num_blocks: int, compute: torch.dtype | None,
                 source_fingerprint: str | None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the config (less where it runs), the resolved
    compute dtype, the model source and the calibration windows."""
    from . import __version__

    return {
        "config": {k: v for k, v in config.to_dict().items() if k not in ("device", "offload_device")},
        "compute_dtype": str(compute or torch.float32),
        "model": source_fingerprint,
        "num_blocks": num_blocks,
        "calibration": hashlib.sha256(calib_ids.contiguous().numpy().tobytes()).hexdigest(),
        "fusegpt": __version__,
    }


def _merged_param_count(model) -> int:
    """Parameters of the model once fused layers are merged (LoRA, coefficients and donors excluded; tied weights
    counted once)."""
    from .fusion import FusedLinear, FusionCoefficient

    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, FusionCoefficient):
            continue
        own = [m.weight, m.bias] if isinstance(m, FusedLinear) else list(m.parameters(recurse=False))
        for p in own:
            if p is not None:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def search(model, config: CompressConfig, *, fitness: str | None = None, tokenizer=None,
           calib_ids: torch.Tensor | None = None, records=None, compute_dtype: torch.dtype | None = None):
    """Search which ``num_removals(config)`` blocks to remove (fusegpt.methods.search): an MI-seeded evolution whose
    fitness is the next-token KL from the dense model on held-out windows, after plain removal (``fitness`` drop) or
    a cheap fusion (fuse; default: the ``search`` options' fitness). The model is left unchanged. ``records``: a
    :class:`fusegpt.runs.RecordLog` that persists every evaluation (and replays them when it already holds some).
    ``compute_dtype``: the dtype the caller already decided (:func:`resolve_compute_dtype`), else decided here.
    Returns a :class:`~fusegpt.methods.search.SearchResult` (``.order`` feeds ``compress --blocks``)."""
    import dataclasses

    from .methods.search import FITNESS, search_blocks

    kind = fitness or config.method_options("search").fitness
    if kind not in FITNESS:
        raise ConfigError(f"--fitness must be one of {FITNESS}, got {kind!r}")
    config = dataclasses.replace(config, method="evopress" if kind == "drop" else "fusegpt-evo", blocks=None)
    job, setup = _prepare_job(model, config, tokenizer=tokenizer, calib_ids=calib_ids, compute_dtype=compute_dtype)
    try:
        res = search_blocks(job, kind, records=records)
    finally:
        job.close()
    res.compute_dtype = str(setup["compute"] or torch.float32)
    res.flops = dict(job.flops)
    return res
