import pytest
import torch
from torch import nn

from fusegpt.activations import Runner
from fusegpt.adapters import UnsupportedModelError, get_adapter, supported_model_types

from conftest import random_ids, tiny_model


def test_registry_lists_families():
    types = supported_model_types()
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"):
        assert t in types


def test_unknown_architecture_is_a_clear_error():
    class Fake(nn.Module):
        class config:
            model_type = "gpt2"

    with pytest.raises(UnsupportedModelError, match="supported model types: .*llama"):
        get_adapter(Fake())


def test_linears_exist_and_biases(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    lins = ad.block_linears(ad.blocks[0])
    assert all(isinstance(m, nn.Linear) for m in lins.values())
    if family == "qwen2":
        assert lins["self_attn.q_proj"].bias is not None and lins["self_attn.o_proj"].bias is None
    if family == "phi3":
        assert set(lins) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blockwise_run_reproduces_model_hidden_states(family, attn):
    model = tiny_model(family, attn=attn)
    ad = get_adapter(model)
    ids = random_ids(5, 24)
    runner = Runner.for_model(ad, 24, device=torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state
        h = runner.run_model_blocks(runner.embed(ids))
        got = ad.final_norm(h)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_block_kinds(family):
    ad = get_adapter(tiny_model(family))
    kinds = ad.block_kinds()
    assert len(kinds) == ad.num_blocks
    if family == "gemma3":
        assert kinds[:3] == ["sliding_attention", "sliding_attention", "full_attention"]
    if family == "qwen2":
        assert set(kinds) == {"full_attention", "sliding_attention"}
    if family == "mistral":
        assert set(kinds) == {"sliding_attention"}


def test_remove_blocks_keeps_model_valid(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    before_types = list(getattr(model.config, "layer_types", None) or [])
    blocks = list(ad.blocks)
    kept = ad.remove_blocks([1, 4])
    assert kept == [0, 2, 3, 5]
    assert model.config.num_hidden_layers == 4
    assert [id(b) for b in ad.blocks] == [id(blocks[i]) for i in kept]
    for i, b in enumerate(ad.blocks):
        for m in b.modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == i
    if before_types:
        assert model.config.layer_types == [before_types[i] for i in kept]
    with torch.no_grad():
        model(random_ids(1, 10))


def test_remove_blocks_errors():
    ad = get_adapter(tiny_model("llama"))
    with pytest.raises(IndexError, match="out of range"):
        ad.remove_blocks([9])
    with pytest.raises(ValueError, match="all 6 blocks"):
        ad.remove_blocks(range(6))
