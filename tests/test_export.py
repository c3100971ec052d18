"""Export round trip: the exported folder loads in stock transformers (a subprocess that never imports fusegpt)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fusegpt.export import OutputExistsError, check_output_dir, drop_blocks, export_model
from fusegpt.fusion import fused_linears, inject_donor
from fusegpt.adapters import get_adapter

from conftest import FAMILIES, random_ids, tiny_model

DROPS = {"llama": [2], "mistral": [0, 5], "qwen2": [1, 2], "qwen3": [4], "gemma3": [1, 3], "phi3": [3]}

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    assert "fusegpt" not in sys.modules
    out = {}
    for folder in sys.argv[2:]:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.load(sys.argv[1])
        with torch.no_grad():
            logits = m(ids, use_cache=False).logits
            g1 = m.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            g0 = m.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        torch.save(logits, folder + "/logits.pt")
        assert "fusegpt" not in sys.modules
        out[folder] = {"layers": m.config.num_hidden_layers, "gen_equal": bool(torch.equal(g1, g0)),
                       "types": getattr(m.config, "layer_types", None)}
    print(json.dumps(out))
    """
)


def _fuse_some(model):
    """Give the model FusedLinears with non-zero terms, so export must merge them."""
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    inject_donor(ad, ad.blocks[0], [ad.blocks[1]], coef_kind="lowrank", coef_rank=4, lora_rank=4, generator=g)
    with torch.no_grad():
        for _, fl in fused_linears(model):
            for p in fl.coefficient_parameters() + fl.lora_parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_export_round_trip_every_family(tmp_path):
    ids = random_ids(2, 12)
    torch.save(ids, tmp_path / "ids.pt")
    expected, folders = {}, []
    for fam in FAMILIES:
        model = tiny_model(fam)
        _fuse_some(model)
        drop = DROPS[fam]
        drop_blocks(model, drop)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        out = export_model(model, None, tmp_path / fam, metadata={"removed": drop})
        assert not fused_linears(model)  # merged in place
        meta = json.loads((out / "fusegpt.json").read_text())
        assert meta["removed"] == drop and meta["num_hidden_layers"] == 6 - len(drop)
        expected[str(out)] = (ref, 6 - len(drop), getattr(model.config, "layer_types", None))
        folders.append(str(out))
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ids.pt"), *folders],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, (ref, layers, types) in expected.items():
        assert got[folder]["layers"] == layers
        assert got[folder]["gen_equal"], f"{folder}: KV-cache generation differs from no-cache generation"
        if types is not None:
            assert got[folder]["types"] == types
        logits = torch.load(folder + "/logits.pt")
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_gemma3_noncontiguous_layer_types(tmp_path):
    model = tiny_model("gemma3")
    types = list(model.config.layer_types)
    drop_blocks(model, [0, 2, 4])
    assert model.config.layer_types == [types[1], types[3], types[5]]


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output_dir(tmp_path, overwrite=False)
    model = tiny_model("llama")
    with pytest.raises(OutputExistsError):
        export_model(model, None, tmp_path, metadata={})
    assert (tmp_path / "keep.txt").read_text() == "user data"
    export_model(model, None, tmp_path, metadata={}, overwrite=True)
    assert not (tmp_path / "keep.txt").exists() and (tmp_path / "config.json").exists()


def test_export_refuses_nan(tmp_path):
    from fusegpt.fusion import NonFiniteWeightError

    model = tiny_model("llama")
    _fuse_some(model)
    fl = fused_linears(model)[0][1]
    with torch.no_grad():
        fl.lora_B.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightError):
        export_model(model, None, tmp_path / "out", metadata={})
    assert not (tmp_path / "out").exists()
