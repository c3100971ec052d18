import math

import torch

from fusegpt.evaluate.perplexity import nll_sum

from conftest import random_ids, tiny_model


def test_ppl_equals_plain_model_loss(family):
    model = tiny_model(family)
    windows = random_ids(6, 32, seed=1)
    total, count = nll_sum(model, windows, batch_size=4, desc=None)
    assert count == 6 * 31
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]
    ref = math.exp(torch.stack(losses).mean().item())
    assert math.isclose(math.exp(total / count), ref, rel_tol=1e-4)
