"""Cleaning and quality rules, each on a document built to pass or to break exactly one rule."""

from __future__ import annotations

import random

import pytest

from lmforge.config import FilterConfig, load_config
from lmforge.data.clean import clean_text
from lmforge.data.filters import RULES, quality_problem
from lmforge.errors import ConfigError

CFG = FilterConfig()
CFG_RULES = set(RULES)


def words(n: int, seed: int = 0, length: tuple[int, int] = (3, 8)) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnoprstuvw") for _ in range(rng.randint(*length)))
            for _ in range(n)]


def sentences(n_words: int, seed: int = 0) -> str:
    w = words(n_words, seed)
    return "\n".join(" ".join(w[i : i + 10]) + "." for i in range(0, n_words, 10))


def rule(text: str, kind: str = "text") -> str | None:
    problem = quality_problem(text, kind, CFG)
    return problem[0] if problem else None


def test_clean_text():
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC composes e + combining acute
    assert clean_text("\ufb01ne", "NFKC") == "fine" and clean_text("\ufb01ne") == "\ufb01ne"
    assert clean_text("a\r\nb\rc") == "a\nb\nc"
    assert clean_text("bell\x07 zero\u200bwidth\ufeff tab\tkept") == "bell zerowidth tab\tkept"
    assert clean_text("x   \n\n\n\n\ny  ") == "x\n\ny"
    assert clean_text("def f():\n    return 1\n") == "def f():\n    return 1"  # indentation kept


def test_good_prose_and_code_pass():
    assert rule(sentences(300)) is None
    code = "\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(20))
    assert rule(code, "code") is None  # repeated line shapes are normal in code


@pytest.mark.parametrize("text, expected", [
    (sentences(20), "min_words"),
    (" ".join(words(300, length=(14, 18))), "mean_word_length"),
    (" ".join(w + (" #" if i % 5 == 0 else "") for i, w in enumerate(words(300))), "symbol_word_ratio"),
    (" ".join(w if i % 3 else "12,345" for i, w in enumerate(words(300))), "alpha_words"),
    ("\n".join("- " + " ".join(words(8, i)) for i in range(40)), "bullet_lines"),
    ("\n".join(" ".join(words(8, i)) + ("..." if i % 2 else ".") for i in range(40)), "ellipsis_lines"),
    ("\n".join(" ".join(words(8, i % 25)) for i in range(40)), "duplicate_lines"),
    (sentences(200) + " " + "free money " * 40, "top_2gram"),
], ids=lambda v: v if v in CFG_RULES else "")
def test_each_rule_catches_its_case(text, expected):
    assert rule(text) == expected


def test_duplicate_paragraphs():
    # Repeated paragraphs repeat their lines too, so the (earlier) line rule is relaxed here.
    text = "\n\n".join(" ".join(words(30, i % 10)) for i in range(40))
    relaxed = FilterConfig(max_duplicate_line_fraction=1.0)
    assert quality_problem(text, "text", relaxed) == ("duplicate_paragraphs", 0.75)


def test_duplicated_ngram_share_is_measured_in_characters():
    unique = words(200, seed=1)
    block = words(20, seed=2)
    text = " ".join(unique[:100] + block + unique[100:] + block)  # 40 of 240 words repeat
    problem = quality_problem(text, "text", CFG)
    assert problem is not None and problem[0] == "duplicate_5gram"
    block_chars, all_chars = 2 * sum(map(len, block)), sum(map(len, unique + block + block))
    assert problem[1] == pytest.approx(block_chars / all_chars, abs=0.002)


def test_code_rules():
    body = "\n".join(f"value_{i} = compute({i})" for i in range(20))
    assert rule("x = 1", "code") == "code_min_chars"
    assert rule(body + "\ndata = [" + "1, " * 600 + "]", "code") == "code_max_line_length"
    assert rule("\n".join("x = '" + "a" * 150 + "'" for _ in range(5)), "code") == "code_mean_line_length"
    assert rule("\n".join("{}[]()=+-*/;:,. " * 3 for _ in range(10)), "code") == "code_alnum_fraction"


def test_disabled_filters_keep_everything():
    assert quality_problem("spam spam", "text", FilterConfig(enabled=False)) is None


def test_filter_config_is_validated_by_field_name():
    cfg = load_config(overrides=["data.filters.min_words=10", "data.dedup.threshold=0.9"])
    assert cfg.data.filters.min_words == 10 and cfg.data.dedup.threshold == 0.9
    with pytest.raises(ConfigError, match="data.filters.max_duplicate_line_fraction=1.5"):
        load_config(overrides=["data.filters.max_duplicate_line_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.dedup.bands=7 must divide data.dedup.num_perm=128"):
        load_config(overrides=["data.dedup.bands=7"])
    with pytest.raises(ConfigError, match="data.decontam.action"):
        load_config(overrides=["data.decontam.action=keep"])
