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


def test_blocks_load_on_the_runs_device(tiny_folder, tmp_path):
    """A BlockStore made for another device loads its blocks where the run computes (on a GPU run the pipeline's
    store, made with the default device, fed CPU blocks to GPU compute); here a store for ``meta`` on a CPU run."""
    from fusegpt.adapters import get_adapter
    from fusegpt.api import compress
    from fusegpt.config import CompressConfig
    from fusegpt.models import load_model
    from fusegpt.offload import BlockStore

    loaded = load_model(tiny_folder, blocks_on_disk=True)
    store = BlockStore(get_adapter(loaded.model), loaded.info["folder"], tmp_path / "work", device="meta")
    cfg = CompressConfig(remove=1, sparsity=None, group_size=2, epochs=1, nsamples=4, score_samples=4, seqlen=32,
                         coef_rank=4, lora_rank=4, batch_size=4, compute_dtype="fp32", offload="disk", device="cpu")
    rep = compress(loaded.model, cfg, tokenizer=loaded.tokenizer, store=store, checkpoint_dir=tmp_path / "run")
    assert store.device == torch.device("cpu") and len(rep.removed) == 1 and store.loads > 0


def test_a_model_too_large_for_memory_streams_its_blocks(tiny_folder, tmp_path, monkeypatch, caplog):
    """With --offload cpu and less memory available than the weights and the working set need, compress does not
    load the model whole (that ends in an out-of-memory kill): it streams the blocks from the checkpoint, as
    --offload disk does, with the preset's final stage off, and says so; the result equals --offload disk's."""
    import logging

    import fusegpt.api

    monkeypatch.setattr(fusegpt.api, "available_memory_bytes", lambda device: 64 << 10)  # 64 KiB left
    runs = {}
    for name, extra in (("auto", []), ("disk", ["--offload", "disk"])):
        with caplog.at_level(logging.WARNING, logger="fusegpt.pipeline"):
            assert main(["compress", str(tiny_folder), "--out", str(tmp_path / name), *SMALL, *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "fusegpt_report.json").read_text())
    assert "do not fit" in caplog.text and "loaded one at a time (--offload disk)" in caplog.text
    assert "final stage is off" in caplog.text
    assert runs["auto"]["config"]["offload"] == "disk" and runs["auto"]["config"]["final_epochs"] == 0
    assert runs["auto"]["removed"] == runs["disk"]["removed"]
    wa, wd = _weights(tmp_path / "auto"), _weights(tmp_path / "disk")
    assert wa.keys() == wd.keys() and all(torch.equal(wa[k], wd[k]) for k in wa)


def test_a_model_too_large_for_memory_is_refused_where_it_cannot_stream(tiny_folder, tmp_path, monkeypatch, capsys):
    import fusegpt.api

    monkeypatch.setattr(fusegpt.api, "available_memory_bytes", lambda device: 64 << 10)
    # a final stage the user asked for trains every block at once: refused before loading, with the way out
    # (2: not the preset's own value, which the automatic choice may switch off)
    assert main(["compress", str(tiny_folder), "--out", str(tmp_path / "f"), *SMALL, "--final-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "--final-epochs 0" in err
    # a method that reads every weight at once
    assert main(["compress", str(tiny_folder), "--out", str(tmp_path / "m"), *SMALL, "--method", "magnitude"]) == 2
    assert "needs every block's weights at once" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not (tmp_path / "m").exists()


def test_offload_decision():
    from fusegpt.config import CompressConfig, ConfigError
    from fusegpt.plan import offload_decision

    cfg = CompressConfig.from_preset("cpu", remove=2, sparsity=None)
    cpu = torch.device("cpu")
    same, why = offload_decision(cfg, weights=10, need=100, available=100, device=cpu, streams=True)
    assert same is cfg and why is None  # fits
    assert offload_decision(cfg, weights=10, need=100, available=None, device=cpu, streams=True)[0] is cfg
    new, why = offload_decision(cfg, weights=2**30, need=3 * 2**30, available=2**30, device=cpu, streams=True)
    assert (new.offload, new.final_epochs, cfg.offload, cfg.final_epochs) == ("disk", 0, "cpu", 1)
    assert "1.00 GiB" in why and "2.00 GiB" in why and "final stage is off" in why
    for epochs in (3, 1):  # set by the user, even to the preset's own value: the user's choice, not switched off
        with pytest.raises(ConfigError, match="--final-epochs 0"):
            offload_decision(CompressConfig.from_preset("cpu", remove=2, sparsity=None, final_epochs=epochs),
                             weights=2, need=3, available=1, device=cpu, streams=True)
    with pytest.raises(ConfigError, match="--final-epochs 0"):  # no preset: every setting is the user's
        offload_decision(CompressConfig(remove=2, sparsity=None, final_epochs=1), weights=2, need=3, available=1,
                         device=cpu, streams=True)
    with pytest.raises(ConfigError, match="--order"):
        offload_decision(CompressConfig(remove=2, sparsity=None, order="fisher"), weights=2, need=3, available=1,
                         device=cpu, streams=True)
    with pytest.raises(ConfigError, match="--dtype bf16"):
        offload_decision(cfg, weights=2, need=3, available=1, device=cpu, streams=False)
    disk = CompressConfig(remove=2, sparsity=None, offload="disk")
    assert offload_decision(disk, weights=2, need=3, available=1, device=cpu, streams=True) == (disk, None)


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


def test_cgroup_limits_the_memory_available(tmp_path):
    """In a container the kernel's MemAvailable is the host's; the control group's limit is what the run has."""
    from fusegpt.device import cgroup_available_bytes

    def write(d, **files):
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name.replace("__", ".")).write_text(text)

    # cgroup v2: a job's group below a limited slice; the tighter of the two counts, inactive file cache is free
    v2 = tmp_path / "v2"
    write(v2 / "slice", memory__max="8000", memory__current="1000", memory__stat="anon 900\ninactive_file 100\n")
    write(v2 / "slice" / "job", memory__max="max", memory__current="500", memory__stat="inactive_file 0\n")
    (tmp_path / "cg2").write_text("0::/slice/job\n")
    assert cgroup_available_bytes(v2, tmp_path / "cg2") == 8000 - (1000 - 100)
    write(v2 / "slice" / "job", memory__max="3000", memory__current="500", memory__stat="inactive_file 200\n")
    assert cgroup_available_bytes(v2, tmp_path / "cg2") == 3000 - 300
    # cgroup v1: the memory controller's hierarchy; an unlimited group (2^63 - 1 rounded to pages) is no limit
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "docker" / "abc", memory__limit_in_bytes="4096", memory__usage_in_bytes="1024",
          memory__stat="cache 10\ntotal_inactive_file 24\n")
    write(v1 / "memory" / "docker", memory__limit_in_bytes="9223372036854771712", memory__usage_in_bytes="5",
          memory__stat="total_inactive_file 0\n")
    (tmp_path / "cg1").write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_available_bytes(v1, tmp_path / "cg1") == 4096 - 1000
    # nothing limited, or nothing readable: None (MemAvailable decides)
    (tmp_path / "cg3").write_text("4:memory:/docker\n")
    assert cgroup_available_bytes(v1, tmp_path / "cg3") is None
    assert cgroup_available_bytes(tmp_path / "none", tmp_path / "missing") is None
