"""Tokenizer encoding, decoding, format and exports, checked against independent truths:
the readable reference encoder, Hugging Face tokenizers/transformers, tiktoken's own file
loader, and round-trip properties."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import DEFAULT_SPECIAL_TOKENS
from lmforge.errors import ConfigError, UserError
from lmforge.tokenizer import export_hf, export_tiktoken, load_tokenizer, train_tokenizer

PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces that stress a byte-level tokenizer: multi-byte scripts, emoji with modifiers and joiners,
# combining marks, control characters, Windows newlines, long runs of spaces and tabs.
TRICKY = ["日本語のテキスト", "中文", "مرحبا بالعالم", "שלום", "👍🏽", "👨‍👩‍👧", "e\u0301", "a\u0308\u0301",
          "\x00", "\x1b[0m", "\r\n", "\r", "\n\n\n", " " * 17, "\t" * 9, " \t \t", "'ll", "123456",
          "<|endoftext|>", "<|end", "|>", "\ufeff", "\U0010ffff"]


def corpus_texts() -> list[str]:
    """A small mixed corpus: some stdlib Python (no download) plus multilingual lines."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in
             ("json/decoder.py", "json/encoder.py", "textwrap.py")]
    rng = random.Random(0)
    texts += ["".join(rng.choice(TRICKY[:8]) + " " for _ in range(40)) for _ in range(30)]
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_texts(), vocab_size=700, workers=1)


unicode_text = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), st.sampled_from(TRICKY)),
    max_size=12,
).map("".join)


@PROPERTY
@given(text=unicode_text)
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.vocab_size for i in ids)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_round_trip_arbitrary_bytes(tok, data):
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@PROPERTY
@given(text=unicode_text)
def test_reference_and_tiktoken_agree(tok, text):
    assert tok.encode(text) == tok.encode_reference(text)
    assert tok.encode(text, allowed_special="all") == tok.encode_reference(text, allowed_special="all")


def test_reference_and_tiktoken_agree_on_real_text(tok):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "difflib.py").read_text(encoding="utf-8")[:60_000]
    assert tok.encode(text) == tok.encode_reference(text)


def test_lone_surrogates_become_replacement_characters(tok):
    text = "a\ud800b \udfff"
    assert tok.encode(text) == tok.encode_reference(text) == tok.encode("a\ufffdb \ufffd")


def test_encode_batch_matches_encode(tok):
    texts = corpus_texts() * 3
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]


@PROPERTY
@given(parts=st.lists(st.one_of(st.sampled_from(DEFAULT_SPECIAL_TOKENS), unicode_text), max_size=8))
def test_special_tokens_never_split(tok, parts):
    text = "".join(parts)
    special_ids = set(tok.special_tokens.values())
    # Allowed: each special token in the text is exactly its one id, in order.
    ids = tok.encode(text, allowed_special="all")
    in_text = re.findall("|".join(map(re.escape, DEFAULT_SPECIAL_TOKENS)), text)
    assert [i for i in ids if i in special_ids] == [tok.special_tokens[s] for s in in_text]
    assert tok.decode(ids) == text
    # Not allowed (the default): plain text, no special id ever appears.
    plain = tok.encode(text)
    assert not special_ids.intersection(plain)
    assert tok.decode(plain) == text


def test_special_tokens_exact_ids(tok):
    eot, user = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|user|>"]
    ids = tok.encode("a<|endoftext|><|user|>b", allowed_special={"<|endoftext|>"})
    assert eot in ids and user not in ids
    assert tok.encode("<|user|>", allowed_special="all") == [user]
    with pytest.raises(ValueError):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_special_ids_follow_the_merges_in_configured_order(tok):
    first = 256 + len(tok.merges)
    assert tok.special_tokens == {s: first + i for i, s in enumerate(DEFAULT_SPECIAL_TOKENS)}
    assert tok.vocab_size == first + len(DEFAULT_SPECIAL_TOKENS)
    assert (tok.eot_id, tok.pad_id) == (first, first + 1)
    assert tok.token_bytes(tok.eot_id) == b""
    custom = train_tokenizer(["abc abc"], vocab_size=260, special_tokens=["<|x|>", "<|y|>"])
    assert custom.special_tokens == {"<|x|>": 258, "<|y|>": 259}


@pytest.mark.parametrize("vocab_size, specials", [(100, DEFAULT_SPECIAL_TOKENS),
                                                 (261, DEFAULT_SPECIAL_TOKENS),
                                                 (1000, ["<|a|>", "<|b|>", "<|a|>"]),
                                                 (1000, [""])])
def test_bad_vocab_or_specials_is_a_clear_error(vocab_size, specials):
    with pytest.raises(ConfigError, match="tokenizer\\.(vocab_size|special_tokens)"):
        train_tokenizer(["some text"], vocab_size=vocab_size, special_tokens=specials)


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# -- format ------------------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.content_hash == tok.content_hash
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    text = "".join(TRICKY)
    assert loaded.encode(text) == tok.encode(text)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["format"] == "lmforge-bpe" and data["version"] == 1
    assert data["vocab_size"] == tok.vocab_size


@pytest.mark.parametrize("damage", ["missing", "not json", "wrong format", "new version",
                                    "edited merges", "bad merge"])
def test_bad_tokenizer_file_is_one_line_user_error(tok, tmp_path, damage):
    path = tok.save(tmp_path)
    data = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not json":
        path.write_text("{truncated")
    elif damage == "wrong format":
        path.write_text(json.dumps({**data, "format": "other"}))
    elif damage == "new version":
        path.write_text(json.dumps({**data, "version": 99}))
    elif damage == "edited merges":
        data["merges"][0] = data["merges"][1][::-1]
        path.write_text(json.dumps(data))
    elif damage == "bad merge":
        data["merges"][0] = [5000, 1]
        path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert "tokenizer.json" in message and "\n" not in message


def test_top_level_load_tokenizer(tok, tmp_path):
    import lmforge

    tok.save(tmp_path)
    assert lmforge.load_tokenizer(tmp_path).content_hash == tok.content_hash


# -- exports -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    return export_hf(tok, tmp_path_factory.mktemp("hf"))


@PROPERTY
@given(text=unicode_text)
def test_hf_tokenizers_export_agrees(tok, hf_dir, text):
    from tokenizers import Tokenizer as HFTokenizer

    hf = _hf_tokenizer(hf_dir, HFTokenizer)
    # Hugging Face always reads special tokens in text as special: our allowed_special="all".
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allowed_special="all")


def test_hf_exports_agree_on_real_text(tok, hf_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text(encoding="utf-8") for n in ("difflib.py", "heapq.py")]
    texts += ["".join(TRICKY), "<|user|>hi<|end|><|assistant|>yo<|endoftext|><|pad|>"]
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    for text in texts:
        ours = tok.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ours
        assert fast.encode(text, add_special_tokens=False) == ours
        assert fast.decode(ours) == text
    assert fast.eos_token == "<|endoftext|>" and fast.pad_token_id == tok.pad_id


_HF_CACHE: dict = {}


def _hf_tokenizer(hf_dir, cls):
    if hf_dir not in _HF_CACHE:
        _HF_CACHE[hf_dir] = cls.from_file(str(hf_dir / "tokenizer.json"))
    return _HF_CACHE[hf_dir]


def test_tiktoken_export_loads_in_tiktoken(tok, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    export_tiktoken(tok, tmp_path)
    config = json.loads((tmp_path / "tiktoken_config.json").read_text())
    ranks = load_tiktoken_bpe(str(tmp_path / config["mergeable_ranks_file"]))
    enc = tiktoken.Encoding("exported", pat_str=config["pat_str"], mergeable_ranks=ranks,
                            special_tokens=config["special_tokens"])
    text = "".join(TRICKY) + (Path(sysconfig.get_paths()["stdlib"]) / "heapq.py").read_text()
    assert enc.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
