"""The multiple-choice scorer against a direct computation: each continuation's summed
log-probability and greedy match from one full forward pass of context + continuation, for
contexts and continuations of mixed lengths (shared contexts, one-token continuations, pairs
that fill the model's window) and any batch size."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.eval.scoring import score_requests
from lmforge.model import Transformer

WINDOW = 40
VOCAB = 64


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = load_config(overrides=[f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
                                 "model.n_heads=4", "model.n_kv_heads=2", f"model.max_seq_len={WINDOW}"])
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


def requests() -> list[tuple[list[int], list[int]]]:
    rng = random.Random(0)
    out = []
    for _ in range(30):
        context = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(1, 4)):  # the choices of one question share its context
            size = rng.choice([1, 1, 2, 5, 12, WINDOW + 1 - len(context)])
            out.append((context, [rng.randrange(VOCAB) for _ in range(size)]))
    return out


def direct(model: Transformer, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor(context + continuation)
    logp = F.log_softmax(model(ids[None, :-1])[0].float(), dim=-1)[len(context) - 1:]
    target = torch.tensor(continuation)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_scores_equal_a_full_forward_pass_of_each_pair(model, batch_size):
    pairs = requests()
    assert any(len(c) + len(k) == WINDOW + 1 for c, k in pairs)  # some fill the window exactly
    with torch.no_grad():
        scores = score_requests(model, pairs, batch_size=batch_size)
        truth = [direct(model, c, k) for c, k in pairs]
    for score, (logprob, greedy) in zip(scores, truth, strict=True):
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy
