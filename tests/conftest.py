"""Tiny random models built offline from configs, one per supported family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (`-n N`) every worker computes with one thread, and so do the processes it starts: N busy
# workers on N cores, none waiting on a core another holds (a 2-thread torch process beside a busy core runs ~9x
# slower on the 2-core reference machine).
_PARALLEL = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _PARALLEL:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if _PARALLEL else min(2, torch.get_num_threads()))

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False,
)


def tiny_config(family: str, num_layers: int = 6):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=num_layers, **_COMMON)
    if family == "mistral":
        return tf.MistralConfig(num_hidden_layers=num_layers, sliding_window=8, **_COMMON)
    if family == "qwen2":
        # q/k/v biases; the top half of the blocks use sliding-window attention
        return tf.Qwen2Config(num_hidden_layers=num_layers, use_sliding_window=True, sliding_window=8,
                              max_window_layers=num_layers // 2, **_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=num_layers, head_dim=16, **_COMMON)
    if family == "gemma3":
        types = ["sliding_attention", "sliding_attention", "full_attention"] * (num_layers // 3 + 1)
        return tf.Gemma3TextConfig(num_hidden_layers=num_layers, head_dim=16, sliding_window=8,
                                   layer_types=types[:num_layers], **_COMMON)
    if family == "phi3":
        return tf.Phi3Config(num_hidden_layers=num_layers, pad_token_id=0, **_COMMON)
    raise KeyError(family)


def tiny_model(family: str, num_layers: int = 6, seed: int = 0, attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, num_layers)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg)
    # random, non-trivial norms and biases so that every path matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def final_hidden_without(model, ids, skip):
    """Brute force: a deep copy with block `skip` removed; the input of the final norm, captured by a hook."""
    import copy

    from fusegpt.adapters import get_adapter

    m = copy.deepcopy(model)
    if skip is not None:
        get_adapter(m).remove_blocks([skip])
    got = {}
    h = m.model.norm.register_forward_hook(lambda mod, inp, out: got.setdefault("h", inp[0]))
    with torch.no_grad():
        m.model(input_ids=ids, use_cache=False)
    h.remove()
    return got["h"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def random_ids(n: int, t: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from fusegpt.data import load_text

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("wikitext2-valid")[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    cfg = tiny_config("llama", 6)
    cfg.vocab_size = len(fast)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
