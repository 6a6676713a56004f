"""`generate_text` with a model whose vocabulary is larger than its tokenizer's.

The truth here is a property: ids the tokenizer does not have are never produced, whatever the
logits say, and the text decodes. A forward hook rigs the model's LM head so the padded ids carry the
largest logits; without the limit, sampling picks them (checked, so the test can fail).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine import generate_text, sample_next, stream
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

TEXTS = ["the cat sat on the mat. " * 20, "a dog ran in the park, the dog was happy. " * 20]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, workers=1)


def rigged_model(vocab_size: int = 384) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=2,
                                   max_seq_len=64, tie_embeddings=False))


def pad_biased(model: Transformer, lo: int, hi: int, value: float = 50.0):
    """A forward hook adding `value` to the logits of ids lo..hi-1 (a model that loves them), on
    the LM head: the engine's prefill computes its logits without the model's own forward."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., lo:hi] += value
        return logits
    return model.lm_head.register_forward_hook(hook)


def test_padded_ids_are_never_sampled(tokenizer):
    model = rigged_model()
    pad_biased(model, tokenizer.vocab_size, model.cfg.vocab_size)
    # Sanity: without the limit the model does emit padded ids (so this test can fail).
    free = list(stream(model, [tokenizer.eot_id], 20, temperature=1.0,
                             generator=torch.Generator().manual_seed(0)))
    assert any(t >= tokenizer.vocab_size for t in free)

    for temperature, top_k, top_p in ((1.0, None, None), (1.5, 0, 1.0), (0.7, 50, 0.9), (0.0, None, None)):
        out = generate_text(model, tokenizer, "the cat", 30, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=1)
        assert out.token_ids, "the continuation is not empty"
        assert all(0 <= t < tokenizer.vocab_size for t in out.token_ids)
        assert out.text == tokenizer.decode_bytes(out.token_ids).decode("utf-8", "replace")


def test_sample_next_limit_matches_sampling_the_truncated_logits():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    a = sample_next(logits, 0.9, top_k=5, top_p=0.8, generator=torch.Generator().manual_seed(3), vocab_limit=25)
    b = sample_next(logits[:, :25].clone(), 0.9, top_k=5, top_p=0.8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits, 0, vocab_limit=25), logits[:, :25].argmax(-1))


def test_generation_stops_at_end_of_text(tokenizer):
    model = rigged_model()
    eot = tokenizer.eot_id
    pad_biased(model, eot, eot + 1)  # <|endoftext|> is the model's favourite valid token
    pad_biased(model, tokenizer.vocab_size, model.cfg.vocab_size, value=100.0)  # padding even more
    out = generate_text(model, tokenizer, "", 30, temperature=0.0)
    assert out.token_ids == [] and out.text == ""


def test_streamed_pieces_make_the_text(tokenizer):
    model = rigged_model()
    pieces: list[str] = []
    out = generate_text(model, tokenizer, "a dog", 25, temperature=1.0, top_k=None, seed=4,
                        on_text=pieces.append)
    assert "".join(pieces) == out.text
    assert model.training  # generate_text restores the mode it found


def test_non_finite_logits_are_one_clear_error_not_a_multinomial_crash():
    from lmforge.engine import sample_next
    from lmforge.errors import UserError

    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(UserError, match="non-finite logits"):
        sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sample_next(torch.tensor([[0.0, 5.0, 1.0]]), temperature=1e-3,
                       generator=torch.Generator().manual_seed(0)).tolist() == [1]
