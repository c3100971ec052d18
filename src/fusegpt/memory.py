"""Memory a compression run needs on top of the process and the model, as a formula of its sizes.

Pure arithmetic (docs/METHOD.md, "Memory", gives the same formula): every term is a product of the calibration
shape (N windows of T tokens, S scoring windows), the hidden sizes of the model (H, the key/value width Hkv, the
MLP width I), the group (G receivers, mini-batch B) and the cache policy (R resident entries), never of the depth L.

- cache: R x (N + S) x T x H x b_cache (both activation caches at their bound; with offload = disk the entries
  are files and only the one in use, the group input, is in memory: N x T x H x b_cache);
- group: the teacher's output y, N x T x H x b_cache, plus the group input x when it is not a cache entry;
- training: the trainable parameters with their gradient, two Adam moments and the copy distillation keeps to
  restore them on divergence (20 bytes each); the autograd
  activations of a mini-batch, a = (9 H + 4 I) x 4 bytes per token and block (two RMSNorm inputs and outputs,
  the SDPA inputs q, k, v and output with k/v repeated to H, the attention output, the MLP's gate, up, SiLU and
  product); the attention matrix of a block, B x heads x T x T x 4 (scores and probabilities in the forward, their
  gradients in the backward); the fused weights (``fusion.math.fused_linear``): W_eff, out x in x 4 bytes (2 under
  bf16 / fp16 compute, which forms it in that dtype: the 4 is a bound) per
  receiving linear, kept for backward, and, for one layer at a time, the terms it is formed from and the two
  weight-sized gradients of its backward (G = g^T x and G ⊙ D), at most four out x in x 4 bytes. Without gradient
  checkpointing every student block keeps its activations, probabilities and W_eff; with it, every block keeps its
  input (B x T x H x 4), one block at a time holds the rest, and W_eff is formed again in backward (not kept);
- dense targets (``--target dense``): the original model's hidden states at D block boundaries, D x N x T x H x
  b_cache, in memory with offload = cpu (files with offload = disk);
- scoring: the full and the skipped final hidden states of the S scoring windows and one running copy
  (3 x S x T x H x 4);
- the final stage (``--final-epochs``, after the last fusion): every one of the F remaining blocks trains at once
  (LoRA + norms, 20 bytes per trainable parameter as above), so its autograd memory is the training term's with F
  blocks instead of G (activations, attention matrices and W_eff = W + B A per block, or with checkpointing the
  inputs of F blocks and one block's rest), plus its embedded windows (N_f x T x H x 4, N_f = ``--final-nsamples``
  or N; beyond N also their dense targets, (N_f - N) x T x H x b_cache) and one chunk of
  the logit-KL (``LOGIT_CHUNK`` = 512 tokens x V: student and teacher logits, their log-softmax and the gradient,
  6 x 512 x V x 4 at most: a top-k teacher's path; the full teacher's holds three [512, V] arrays in the compute
  dtype and runs its fp32 passes on blocks of a few rows) when its loss reads the logits (``--final-loss
  logit-kl``; none for a hidden-state loss);
- a group loss that reads the logits (``--loss logit-kl``, or it as the weighted ``--aux-loss``) adds the same
  chunk to the training term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "MemoryEstimate", "estimate_memory", "activation_bytes_per_token", "trainable_params", "lora_params",
    "AUTO_CHECKPOINT_BYTES", "AUTO_CHECKPOINT_FRACTION", "auto_checkpoint",
]

# --grad-checkpoint auto switches it on for a phase when it would save more than AUTO_CHECKPOINT_BYTES and the
# phase's memory without it (with the caches) would take more than AUTO_CHECKPOINT_FRACTION of the memory available
# at the start (free device memory, or the host's MemAvailable; where that cannot be read, the saving alone decides)
AUTO_CHECKPOINT_BYTES = 1 << 30
AUTO_CHECKPOINT_FRACTION = 0.5


def auto_checkpoint(saving: int, need: int, available: int | None) -> bool:
    """--grad-checkpoint auto for one phase: recompute forwards (about one more forward per step) only when that
    saves more than AUTO_CHECKPOINT_BYTES and the phase without it (``need`` bytes over the baseline) would take more
    than AUTO_CHECKPOINT_FRACTION of the ``available`` memory: time is spent for memory only where memory is short."""
    if saving <= AUTO_CHECKPOINT_BYTES:
        return False
    return available is None or need > AUTO_CHECKPOINT_FRACTION * available


def lora_params(linears: list[tuple[int, ...]], rank: int) -> int:
    """LoRA parameters (A and B) of rank ``rank`` on ``linears`` = (out, in, ...) of one block."""
    return sum((out + inp) * min(rank, out, inp) for out, inp, *_ in linears) if rank > 0 else 0


def trainable_params(linears: list[tuple[int, int, bool]], norm_params: int, *, coef: str, coef_rank: int,
                     lora_rank: int, train: str) -> int:
    """Trainable parameters of one receiving block: ``linears`` = (out, in, has_bias) of its fusable linears."""
    total = 0
    for out, inp, bias in linears:
        r = min(coef_rank, out, inp)
        total += {"scalar": 1, "vector": out, "matrix": out * inp, "lowrank": (out + inp) * r}[coef]
        total += out if bias else 0
        if train == "full":
            total += out * inp + (out if bias else 0)
    if train == "coef+lora":
        total += lora_params(linears, lora_rank)
    if train in ("coef+lora", "full"):
        total += norm_params
    return total


@dataclass
class MemoryEstimate:
    cache: int
    group: int
    training: int
    scoring: int
    activations_per_token_block: int
    grad_checkpoint: bool
    inputs: dict | None = None  # the arguments it was computed from (to recompute a step's prediction)
    final: int = 0  # the final stage (0 = none)
    final_checkpoint: bool = False  # gradient checkpointing in the final stage (decided on its own memory)

    @property
    def total(self) -> int:
        """Peak over the process and model baseline: the largest phase (training holds the group too)."""
        return self.cache + max(self.group + self.training, self.scoring, self.final)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("inputs")
        return {**d, "total": self.total}

    def at_step(self, calib_resident: int, score_resident: int) -> "MemoryEstimate":
        """The same formula with the entries the caches really hold at a step."""
        kw = {k: v for k, v in (self.inputs or {}).items()}
        est = estimate_memory(**kw, calib_resident=calib_resident, score_resident=score_resident)
        est.inputs = self.inputs
        return est


def activation_bytes_per_token(hidden: int, intermediate: int, bytes_per: int = 4) -> int:
    """Autograd activations one decoder block keeps per token for its backward pass (see the module docstring)."""
    return (9 * hidden + 4 * intermediate) * bytes_per


def estimate_memory(
    *, n: int, s: int, t: int, hidden: int, intermediate: int, heads: int, group: int, batch: int,
    cache_entries: int | None, cache_bytes: int, offload: str, trainable: int, receiver_linear_params: int,
    largest_linear: int, grad_checkpoint: bool, calib_resident: int | None = None, score_resident: int | None = None,
    block_bytes: int = 0, targets: int = 0, final_blocks: int = 0, final_trainable: int = 0, vocab: int = 0,
    head_vocab: int = 0,
    final_checkpoint: bool | None = None, final_windows: int = 0, final_batch: int = 0, final_topk: int = 0,
) -> MemoryEstimate:
    """The formula of the module docstring.

    ``cache_entries`` (R) bounds each cache; ``calib_resident`` / ``score_resident``, when given, are the entries
    the caches hold at a step (at most R; what the prediction of that step uses); ``targets``: dense-target
    boundaries held (D). ``receiver_linear_params``: out x
    in summed over the receivers' linears; ``heads``: attention heads (SDPA on the CPU materialises the T x T
    scores and probabilities of a block, and their gradients in backward). The final stage: ``final_blocks`` (F,
    0 = none), ``final_trainable`` (its trainable parameters over all F blocks), ``vocab`` (the width of the logits its
    loss reads; 0 = a hidden-state loss); ``head_vocab``: the same for the group loss; ``final_checkpoint``:
    gradient checkpointing in the final stage (default: as ``grad_checkpoint``); ``final_windows``: its windows
    (0 = n; more also holds their dense targets beside the D boundaries); ``final_batch``: its windows per step
    (0 = ``batch``); ``final_topk``: the teacher's top-k tokens kept per token (k log-probabilities and ids, the
    tail's mass)."""
    entry = t * hidden * cache_bytes
    r = cache_entries or 1
    rc = r if calib_resident is None else calib_resident
    rs = r if score_resident is None else score_resident
    cache = n * entry if offload == "disk" else rc * n * entry + rs * s * entry + targets * n * entry
    # offload disk: the baseline holds no block; a step loads the span (G + 1 blocks) and keeps the donor's weights
    # in the receivers (one block's linears, shared); with offload cpu both are part of the baseline
    loaded = (group + 2) * block_bytes if offload == "disk" else 0
    per_tok = activation_bytes_per_token(hidden, intermediate)
    w_block = receiver_linear_params // max(group, 1)  # one block's linears, out x in summed

    def backward_bytes(blocks: int, ckpt: bool, batch: int) -> int:
        """Autograd memory of ``blocks`` trained at once on one mini-batch of ``batch`` windows."""
        tokens = batch * t
        att = batch * heads * t * t * 4  # one block's attention matrix (fp32)
        if ckpt:
            # every student block's input is kept; one block at a time is recomputed with its activations and
            # attention matrices (scores, probabilities and their gradients); W_eff is not kept, so the fused
            # weights' temporaries (4 x out x in) exist for one layer at a time
            return blocks * tokens * hidden * 4 + tokens * per_tok + 4 * att + 16 * largest_linear
        # every block keeps its activations, attention probabilities and W_eff for backward; one block's backward
        # adds three attention-sized gradients, and one layer at a time its weight temporaries (4 x out x in)
        return blocks * (tokens * per_tok + att + 4 * w_block) + 3 * att + 16 * largest_linear

    from .distill.losses import LOGIT_CHUNK

    training = (20 * trainable + backward_bytes(group, grad_checkpoint, batch)
                + 6 * min(LOGIT_CHUNK, batch * t) * head_vocab * 4)
    final = 0
    final_checkpoint = grad_checkpoint if final_checkpoint is None else final_checkpoint
    if final_blocks:
        nf, bf = final_windows or n, final_batch or batch
        final = (20 * final_trainable + backward_bytes(final_blocks, final_checkpoint, bf) + nf * t * hidden * 4
                 + max(nf - n, 0) * entry + 6 * min(LOGIT_CHUNK, bf * t) * vocab * 4
                 + (nf * t * (8 * min(final_topk, vocab) + 4) if final_topk else 0))
    return MemoryEstimate(cache=cache, group=n * entry + loaded, training=training, scoring=3 * s * t * hidden * 4,
                          activations_per_token_block=per_tok, grad_checkpoint=grad_checkpoint, final=final,
                          final_checkpoint=bool(final_checkpoint and final_blocks))
