"""Persisting a removal run after every finished step, and continuing it after a crash.

A run folder (``OUT/.fusegpt-run`` for ``fusegpt compress``) holds:

- ``settings.json``: the config, the model source's fingerprint, the calibration windows' hash; resuming with
  anything else is refused, naming the difference;
- ``blocks/b<orig>-s<step>.safetensors``: the state dict of every block whose weights a step changed (receivers:
  plain linears after consolidation, else the fused layers with donors, coefficients and LoRA), with the
  structure needed to rebuild it (:meth:`FusedLinear.spec`); written atomically before the step's record;
- ``steps.jsonl``: one fsync'ed record per finished step: its report, the files of the blocks it changed, the
  seeded generator's state and the FLOP counters.

Resuming replays the removals on the freshly loaded model, rebuilds and loads every changed block, restores the
generator, and the method continues at the next step. The activation caches are recomputed from the embeddings,
which gives the same values (same blocks, same mini-batches), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..fusion.inject import block_spec, rebuild_block
from ..offload import save_tensors_atomic
from ..distributed import is_main
from ..runs import RecordLog, atomic_write_json, check_settings
from .base import Job, StepReport

log = logging.getLogger(__name__)

__all__ = ["Checkpoint"]


_FLOAT_FIELDS = ("loss_before", "loss_after", "mse_before", "mse_after")


def _report(data: dict[str, Any]) -> StepReport:
    rep = StepReport(**data)
    if rep.scores is not None:
        rep.scores = {int(k): float(v) for k, v in rep.scores.items()}
    for f in _FLOAT_FIELDS:  # JSON keeps nan/inf as strings
        v = getattr(rep, f)
        if isinstance(v, str):
            setattr(rep, f, float(v))
    rep.epoch_losses = [float(v) for v in rep.epoch_losses]
    return rep


def _generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def _set_generator_state(g: torch.Generator, text: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone())


class Checkpoint:
    """The run folder of one resumable removal run."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.log = RecordLog(self.folder / "steps.jsonl")

    @property
    def settings_path(self) -> Path:
        return self.folder / "settings.json"

    def exists(self) -> bool:
        return self.settings_path.is_file()

    def start(self, settings: dict[str, Any], *, resume: bool) -> None:
        """A new run writes ``settings``; a resumed one must match them (RunMismatchError otherwise)."""
        if resume and self.exists():
            check_settings(self.settings_path, settings, what="run")
            return
        if not is_main():  # under torch.distributed rank 0 writes the run folder; the others only read it
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in (self.folder / "blocks").glob("*.safetensors") if (self.folder / "blocks").is_dir() else ():
            f.unlink()
        self.log.path.unlink(missing_ok=True)
        (self.folder / "targets.safetensors").unlink(missing_ok=True)
        (self.folder / "search.jsonl").unlink(missing_ok=True)  # a search method's evaluations
        atomic_write_json(self.settings_path, settings)

    # ---- writing ----------------------------------------------------------------------------------------------
    def save(self, job: Job, rep: StepReport, changed: list[int]) -> None:
        if not is_main():
            return
        blocks = list(job.adapter.blocks)
        files: dict[str, dict[str, Any]] = {}
        for cur in changed:
            orig = job.state.orig[cur]
            name = f"b{orig:04d}-s{rep.step:04d}.safetensors"
            with job.runner.resident([blocks[cur]]):  # offloaded blocks: read back from the work folder
                state = {k: v.detach().contiguous().cpu() for k, v in blocks[cur].state_dict().items()}
                spec = block_spec(job.adapter, blocks[cur])
            save_tensors_atomic(state, self.folder / "blocks" / name)
            files[str(orig)] = {"file": name, "spec": spec}
        previous = self.log.read()
        self.log.append({"step": rep.step, "report": rep, "blocks": files,
                         "generator": _generator_state(job.generator), "flops": dict(job.flops)})
        # files superseded by this step (same block, earlier step) are no longer needed
        for rec in previous:
            for orig, f in rec["blocks"].items():
                if orig in files or int(orig) not in job.state.orig:
                    (self.folder / "blocks" / f["file"]).unlink(missing_ok=True)

    def save_targets(self, store) -> None:
        """The dense targets (``--target dense``), written once before the first removal."""
        if is_main():
            save_tensors_atomic({f"b{b}": store.get(b).contiguous() for b in store.keys()},
                                self.folder / "targets.safetensors")

    # ---- reading ----
    def load_targets(self, store) -> bool:
        """Put the saved dense targets into ``store``; False when the run folder has none."""
        path = self.folder / "targets.safetensors"
        if not path.is_file():
            return False
        for k, v in load_file(path).items():
            store.put(int(k[1:]), v)
        return True

    # ---- reading (steps) -------------------------------------------------------------------------------------------
    def restore(self, job: Job) -> int:
        """Replay every recorded step on ``job``'s freshly loaded model; returns how many steps were restored."""
        records = self.log.read()
        if not records:
            return 0
        ad, state = job.adapter, job.state
        latest: dict[int, dict[str, Any]] = {}
        for rec in records:
            rep = _report(rec["report"])
            p = state.current(rep.removed)
            ad.remove_blocks([p])
            state.orig.pop(p)
            state.steps.append(rep)
            latest.update({int(k): v for k, v in rec["blocks"].items()})
        blocks = list(ad.blocks)
        for orig, f in latest.items():
            if orig not in state.orig:
                continue  # changed, then removed in a later step
            block = blocks[state.current(orig)]
            rebuild_block(ad, block, f["spec"])
            values = load_file(self.folder / "blocks" / f["file"])
            ref = block.state_dict()
            store = job.runner.store
            if store is not None:  # offloaded: the block's new home is the store's work folder
                block.load_state_dict({k: v.to(dtype=ref[k].dtype) for k, v in values.items()}, strict=True,
                                      assign=True)
                store.save(block)
                store.release(block)
                continue
            values = {k: v.to(device=ref[k].device, dtype=ref[k].dtype) for k, v in values.items()}
            block.load_state_dict(values, strict=True)
        _set_generator_state(job.generator, records[-1]["generator"])
        job.flops.update(records[-1]["flops"])
        for cache in state.caches.values():
            cache.truncate(1)
        log.info("resumed after step %d of %d (removed %s)", len(records), job.num_removals,
                 [s.removed for s in state.steps])
        return len(records)
