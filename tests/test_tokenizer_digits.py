"""tokenizer.digits: one digit per token, or GPT-4's groups of up to three."""

from __future__ import annotations

import pytest

from lmforge.config import GPT4_SPLIT_PATTERN, TokenizerConfig
from lmforge.errors import ConfigError
from lmforge.tokenizer import train_tokenizer

NUMBERS = " ".join(str(n * 37 % 100_000) for n in range(3000))  # many repeated digit pairs


@pytest.mark.parametrize("digits, longest", [(1, 1), (3, 3)])
def test_no_token_holds_more_digits_than_allowed(digits, longest):
    pattern = TokenizerConfig(digits=digits).split_pattern
    tok = train_tokenizer([NUMBERS], vocab_size=600, pattern=pattern, workers=1)
    digit_tokens = [tok.token_bytes(i).strip() for i in range(256, 256 + len(tok.merges))]
    digit_tokens = [t for t in digit_tokens if t.isdigit()]
    assert max(map(len, digit_tokens), default=1) == longest
    pieces = [tok.decode([i]) for i in tok.encode("12345")]
    assert (pieces == list("12345")) == (digits == 1)


def test_default_keeps_the_gpt4_pattern_and_a_custom_pattern_needs_the_digit_rule():
    assert TokenizerConfig().split_pattern == GPT4_SPLIT_PATTERN
    with pytest.raises(ConfigError, match="tokenizer.digits=1 needs tokenizer.pattern"):
        TokenizerConfig(pattern=r"\w+|\s+", digits=1).validate()
    with pytest.raises(ConfigError, match="tokenizer.digits"):
        TokenizerConfig(digits=0).validate()
