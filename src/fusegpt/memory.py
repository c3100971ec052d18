"""Memory a compression run needs on top of the process and the model, as a formula of its sizes.

Pure arithmetic (docs/METHOD.md, "Memory", gives the same formula): every term is a product of the calibration
shape (N windows of T tokens, S scoring windows), the hidden sizes of the model (H, the key/value width Hkv, the
MLP width I), the group (G receivers, mini-batch B) and the cache policy (R resident entries), never of the depth L.

- cache: R x (N + S) x T x H x b_cache (both activation caches at their bound; with offload = disk the entries
  are files and only the one in use, the group input, is in memory: N x T x H x b_cache);
- group: the teacher's output y, N x T x H x b_cache, plus the group input x when it is not a cache entry;
- training: the trainable parameters with their gradient and two Adam moments (16 bytes each), the fused
  weights' temporaries (per receiving linear, out x in x 4 bytes each: W_eff and the three terms it is summed
  from in the forward, three gradients of the same size in the backward; all receivers at once, or one block at a
  time with gradient checkpointing), and the autograd activations of a mini-batch: (9 H + 4 I) x 4 bytes per
  token and block (two RMSNorm inputs and outputs, the SDPA inputs q, k, v and output with k/v repeated to H,
  the attention output, the MLP's gate, up, SiLU and product), for all G student blocks, or with gradient
  checkpointing for one block plus every block's
  input (B x T x H x 4 each);
- scoring: the full and the skipped final hidden states of the S scoring windows and one running copy
  (3 x S x T x H x 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "MemoryEstimate", "estimate_memory", "activation_bytes_per_token", "trainable_params", "AUTO_CHECKPOINT_BYTES",
]

# --grad-checkpoint auto switches it on when the group's autograd activations would exceed this
AUTO_CHECKPOINT_BYTES = 1 << 30


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
        elif train == "coef+lora" and lora_rank > 0:
            total += (out + inp) * min(lora_rank, out, inp)
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

    @property
    def total(self) -> int:
        """Peak over the process and model baseline: the largest phase (training holds the group too)."""
        return self.cache + max(self.group + self.training, self.scoring)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def activation_bytes_per_token(hidden: int, intermediate: int, bytes_per: int = 4) -> int:
    """Autograd activations one decoder block keeps per token for its backward pass (see the module docstring)."""
    return (9 * hidden + 4 * intermediate) * bytes_per


def estimate_memory(
    *, n: int, s: int, t: int, hidden: int, intermediate: int, group: int, batch: int, cache_entries: int | None,
    cache_bytes: int, offload: str, trainable: int, receiver_linear_params: int, grad_checkpoint: bool,
) -> MemoryEstimate:
    """The formula of the module docstring. ``cache_entries`` None = unbounded (not predictable without L; the
    estimate then counts one entry); ``receiver_linear_params``: out x in summed over the receivers' linears."""
    entry = t * hidden * cache_bytes
    r = cache_entries or 1
    if offload == "disk":
        cache = n * entry  # the group input read back from its file
        group_in = 0
    else:
        cache = r * (n + s) * entry
        group_in = 0  # x is the cache's most recent entry
    per_tok = activation_bytes_per_token(hidden, intermediate)
    tokens = batch * t
    if grad_checkpoint:
        acts = tokens * per_tok + group * tokens * hidden * 4
    else:
        acts = group * tokens * per_tok
    # fused-weight temporaries (W_eff and its terms, 4 x out x in) and their gradients in backward (3 more): for
    # every receiver at once, or with checkpointing for one block at a time
    temps = 7 * 4 * (receiver_linear_params // max(group, 1) if grad_checkpoint else receiver_linear_params)
    training = 16 * trainable + temps + acts
    return MemoryEstimate(cache=cache, group=n * entry + group_in, training=training, scoring=3 * s * t * hidden * 4,
                          activations_per_token_block=per_tok, grad_checkpoint=grad_checkpoint)
