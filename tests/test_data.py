import json

import pytest
import torch

from fusegpt.data import DataSourceError, load_text, sample_windows, source_names, split_windows


def test_registered_sources():
    assert {"wikitext2", "wikitext2-valid", "wikitext103-valid", "lambada-dev", "lambada-test",
            "boolq-passages"} <= set(source_names())


def test_wikitext2_eval_text_protocol():
    text = load_text("wikitext2")
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n")
    assert "\n\n\n" not in text  # one blank line between rows, rows are non-blank
    assert len(text.split("\n\n")) == 2891


def test_calibration_sources_are_real_text():
    v = load_text("wikitext2-valid")
    assert v.startswith(" \n\n = Homarus gammarus = ")
    assert len(v.split("\n\n")) == 3761  # 3760 lines + the final empty one
    w103 = load_text("wikitext103-valid")
    assert "Homarus gammarus" in w103[:200] and w103.count("<unk>") < v.count("<unk>")
    lam = load_text("lambada-dev")
    assert len(lam.split("\n\n")) == 4869


def test_raw_calibration_and_second_evaluation_text():
    raw = load_text("boolq-passages")
    assert raw.startswith("Ethanol fuel -- ") and "<unk>" not in raw and " @-@ " not in raw
    assert len(raw.split("\n\n")) == 2939  # 3270 questions share 2939 distinct passages
    lam = load_text("lambada-test")
    assert lam.startswith("In my palm is a clear stone") and len(lam) > 1_600_000


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    (tmp_path / "c.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(DataSourceError, match="'text'"):
        load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(DataSourceError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_unknown_source_lists_choices():
    with pytest.raises(DataSourceError, match="wikitext2-valid"):
        load_text("c4")


def test_sampling_is_seeded():
    ids = torch.arange(1000)
    a = sample_windows(ids, 5, 16, torch.Generator().manual_seed(3))
    b = sample_windows(ids, 5, 16, torch.Generator().manual_seed(3))
    c = sample_windows(ids, 5, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 16) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=torch.long))


def test_split_windows():
    w = split_windows(torch.arange(100), 16, None)
    assert w.shape == (6, 16) and w[1, 0] == 16
    assert split_windows(torch.arange(100), 16, 2).shape == (2, 16)
    with pytest.raises(DataSourceError):
        split_windows(torch.arange(10), 16, None)


def test_final_stage_windows_come_after_the_calibration_and_leave_the_heldout_alone(tiny_folder):
    from transformers import AutoTokenizer

    from fusegpt.api import calibration_windows
    from fusegpt.config import CompressConfig

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    base = CompressConfig(remove=1, nsamples=8, seqlen=32, final_epochs=1)
    more = CompressConfig(remove=1, nsamples=8, seqlen=32, final_epochs=1, final_nsamples=12)
    a, b = calibration_windows(tok, base, heldout=4), calibration_windows(tok, more, heldout=4)
    assert a.shape == (12, 32) and b.shape == (16, 32)
    assert torch.equal(a[:8], b[:8]) and torch.equal(a[8:], b[12:])  # calibration and held-out rows unchanged
    assert not torch.equal(b[8:12], a[8:12])
    no_stage = CompressConfig(remove=1, nsamples=8, seqlen=32, final_epochs=0, final_nsamples=12)
    assert torch.equal(calibration_windows(tok, no_stage), a[:8])  # no final stage: no extra windows
