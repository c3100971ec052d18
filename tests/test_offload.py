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
        assert main(["compress", str(tiny_folder), "--out", str(out), *SMALL, "--mode", mode, "--offload", off]) == 0
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
