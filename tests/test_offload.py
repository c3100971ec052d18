"""--offload disk: blocks stay in the checkpoint's files and are loaded only while used; the result is the same."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fusegpt.cli import main

SMALL = ["--remove", "2", "--nsamples", "8", "--score-samples", "4", "--seqlen", "32", "--epochs", "2",
         "--coef-rank", "4", "--lora-rank", "4", "--group-size", "3", "--batch-size", "4", "--compute-dtype", "fp32"]


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("mode", ["iterative", "oneshot"])
def test_disk_offload_gives_the_same_model(tiny_folder, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    runs = {}
    for off in ("cpu", "disk"):
        out = tmp_path / off
        # the final stage cannot stream (it trains every block at once): the cpu preset turns it off with disk
        assert main(["compress", str(tiny_folder), "--out", str(out), *SMALL, "--mode", mode, "--offload", off,
                     "--final-epochs", "0"]) == 0
        runs[off] = (json.loads((out / "fusegpt_report.json").read_text()), _weights(out))
    (rc, wc), (rd, wd) = runs["cpu"], runs["disk"]
    assert rc["removed"] == rd["removed"]
    assert wc.keys() == wd.keys()
    for k in wc:
        assert torch.equal(wc[k], wd[k]), k
    # the streamed perplexity (one block at a time) equals the whole model's
    assert rd["evaluation"]["wikitext2"]["ppl"] == pytest.approx(rc["evaluation"]["wikitext2"]["ppl"], rel=1e-5)
    assert (tmp_path / "disk" / "model.safetensors.index.json").is_file()  # one shard per block
    assert not (tmp_path / "disk" / ".fusegpt-run").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")  # stock transformers loads the shards
    assert back.config.num_hidden_layers == 4


def test_blocks_are_loaded_only_while_used(tiny_folder, tmp_path, monkeypatch):
    from fusegpt.adapters import get_adapter
    from fusegpt.api import compress
    from fusegpt.config import CompressConfig
    from fusegpt.models import load_model
    from fusegpt.offload import BlockStore, is_materialized

    loaded = load_model(tiny_folder, blocks_on_disk=True)
    ad = get_adapter(loaded.model)
    assert not any(is_materialized(b) for b in ad.blocks)
    assert all(not p.is_meta for n, p in loaded.model.named_parameters() if not n.startswith("model.layers."))
    store = BlockStore(ad, loaded.info["folder"], tmp_path / "work")
    most = []
    real_load = BlockStore.load

    def load(self, block):
        real_load(self, block)
        most.append(sum(is_materialized(b) for b in ad.blocks))

    monkeypatch.setattr(BlockStore, "load", load)
    cfg = CompressConfig(remove=2, sparsity=None, group_size=3, epochs=1, nsamples=8, score_samples=4, seqlen=32,
                         coef_rank=4, lora_rank=4, batch_size=4, compute_dtype="fp32", offload="disk")
    rep = compress(loaded.model, cfg, tokenizer=loaded.tokenizer, store=store, checkpoint_dir=tmp_path / "run")
    assert len(rep.removed) == 2 and store.loads > 6
    assert max(most) <= 4  # the group span (G + 1 = 4 blocks), never the whole model (6)
    assert not any(is_materialized(b) for b in ad.blocks)  # all released again
    assert len(store.changed) >= 3  # fused receivers live in the work folder


def test_disk_offload_refuses_methods_that_need_all_weights(tiny_folder, tmp_path, capsys):
    assert main(["compress", str(tiny_folder), "--out", str(tmp_path / "o"), *SMALL, "--method", "magnitude",
                 "--offload", "disk"]) == 2
    assert "--offload cpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mapped_weights_are_views_of_the_file_and_checked(tmp_path, tiny_folder, monkeypatch):
    """Large non-block tensors in the compute dtype are zero-copy views of the checkpoint (equal values), other
    dtypes and small tensors are left to be copied, and a NaN in a mapped tensor is refused at load."""
    from safetensors.torch import save_file

    import fusegpt.offload as offload
    from fusegpt.models import ModelSourceError, load_model

    f = tmp_path / "t.safetensors"
    a, b, c = torch.randn(300, 200), torch.randn(3), torch.randn(300, 200).bfloat16()
    save_file({"a": a, "b": b, "c": c}, f)
    got = offload.map_safetensors(f, ["a", "b", "c", "missing"], torch.float32, min_bytes=1024)
    assert set(got) == {"a"} and torch.equal(got["a"], a)
    assert set(offload.map_safetensors(f, ["c"], torch.bfloat16, min_bytes=1024)) == {"c"}

    monkeypatch.setattr(offload, "MAP_MIN_BYTES", 1024)
    loaded = load_model(tiny_folder, blocks_on_disk=True)
    emb = loaded.model.get_input_embeddings().weight
    assert getattr(emb, offload.MAPPED_ATTR, False)
    assert torch.equal(emb, _weights(tiny_folder)["model.embed_tokens.weight"])

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in tiny_folder.iterdir():
        if p.suffix != ".safetensors":
            (bad / p.name).write_bytes(p.read_bytes())
    w = _weights(tiny_folder)
    w["model.embed_tokens.weight"][3, 5] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="embed_tokens.*non-finite"):
        load_model(bad, blocks_on_disk=True)
