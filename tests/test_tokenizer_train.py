"""The BPE trainer against independent truths: the naive O(n^2) reference trainer, plain
`regex.findall` counting, and Hugging Face `tokenizers` BPE on the same data."""

from __future__ import annotations

import gzip
import json
import re
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import DEFAULT_SPECIAL_TOKENS, GPT4_SPLIT_PATTERN
from lmforge.data.sources import ReadReport, iter_documents
from lmforge.errors import UserError
from lmforge.tokenizer import sources, train
from lmforge.tokenizer.reference import naive_train
from lmforge.tokenizer.train import count_chunks, learn_merges, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def fast_merges(texts, num_merges, pattern=GPT4_SPLIT_PATTERN):
    counts = Counter(c for t in texts for c in regex.findall(pattern, t))
    return learn_merges(counts, num_merges)


# Small alphabets make many equal pair counts, so the tie-break decides most merges.
small_corpus = st.lists(st.text(alphabet="ab c\n", max_size=40), min_size=1, max_size=12)


@settings(derandomize=True, database=None, deadline=None, max_examples=120)
@given(texts=small_corpus, num_merges=st.integers(1, 30))
def test_fast_trainer_learns_the_naive_merges_on_ties(texts, num_merges):
    assert fast_merges(texts, num_merges) == naive_train(texts, GPT4_SPLIT_PATTERN, num_merges)


@settings(derandomize=True, database=None, deadline=None, max_examples=40)
@given(texts=st.lists(st.text(max_size=60), min_size=1, max_size=8), num_merges=st.integers(1, 40))
def test_fast_trainer_learns_the_naive_merges_on_unicode(texts, num_merges):
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # drop lone surrogates
    assert fast_merges(texts, num_merges) == naive_train(texts, GPT4_SPLIT_PATTERN, num_merges)


def test_fast_trainer_learns_the_naive_merges_on_source_code():
    texts = [(STDLIB / "textwrap.py").read_text(encoding="utf-8")]
    assert fast_merges(texts, 300) == naive_train(texts, GPT4_SPLIT_PATTERN, 300)


def test_tie_break_and_overlapping_pairs_by_hand():
    # "ab" and "cd" both occur once: the smaller pair (97, 98) goes first.
    assert fast_merges(["ab cd"], 1, pattern=r"\S+|\s+") == [(97, 98)]
    # "aaaa" holds the pair (a, a) three times but merges left to right into [aa, aa]; then
    # (aa, aa) is the only pair left.
    assert fast_merges(["aaaa"], 5, pattern=r"\S+") == [(97, 97), (256, 256)]
    # "aaa" -> [aa, a] -> [aaa].
    assert fast_merges(["aaa", "aaa"], 5, pattern=r"\S+") == [(97, 97), (256, 97)]


def test_runs_out_of_pairs_gracefully():
    tok = train_tokenizer(["ab"], vocab_size=1000, workers=1)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 256 + 1 + len(DEFAULT_SPECIAL_TOKENS)


def test_parallel_counting_equals_plain_counting(monkeypatch):
    monkeypatch.setattr(train, "BATCH_CHARS", 20_000)  # many batches across two processes
    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py"))]
    texts += [(STDLIB / "textwrap.py").read_text(encoding="utf-8")]
    expected = Counter(c for t in texts for c in regex.findall(GPT4_SPLIT_PATTERN, t))
    assert count_chunks(texts, GPT4_SPLIT_PATTERN, workers=2) == expected
    assert count_chunks(iter(texts), GPT4_SPLIT_PATTERN, workers=1) == expected
    assert count_chunks([], GPT4_SPLIT_PATTERN) == Counter()


def test_streaming_sources_keep_exact_chunk_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 500)  # cut files into many pieces
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8") + "\r\n  \n\tend\r\n"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(text, newline="")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8", newline="") as f:
        f.write(text)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": text}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    pieces = list(sources.iter_texts([str(tmp_path / "d"), str(tmp_path / "*.gz"),
                                      str(tmp_path / "c.jsonl")], text_field="body"))
    assert len(pieces) > 10
    streamed = count_chunks(pieces, GPT4_SPLIT_PATTERN, workers=1)
    whole = Counter(regex.findall(GPT4_SPLIT_PATTERN, text))
    expected = whole + whole + whole + Counter(["x"])
    assert streamed == expected


@pytest.mark.parametrize("content, field, match", [
    ('{"text": "ok"}\n{oops\n', "text", r"c\.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "text", r"c\.jsonl:2: field 'text' is missing"),
])
def test_bad_jsonl_is_reported_or_under_strict_a_user_error_naming_the_line(tmp_path, content, field, match):
    (tmp_path / "c.jsonl").write_text(content)
    report = ReadReport()
    assert list(sources.iter_texts([str(tmp_path / "c.jsonl")], text_field=field, report=report)) == ["ok"]
    assert report.malformed == 1 and re.search(match, report.problems[0])
    with pytest.raises(UserError, match=match):
        list(sources.iter_texts([str(tmp_path / "c.jsonl")], text_field=field, strict=True))


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sources.expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="no files match"):
        sources.expand_inputs([str(tmp_path / "*.nothing")])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt:1: bytes that are not UTF-8"):
        list(sources.iter_texts([str(tmp_path / "latin1.txt")], strict=True))
    with pytest.raises(UserError, match="tokenizer.pattern"):
        train_tokenizer(["x"], vocab_size=300, pattern="(unclosed")


def test_tokenizer_train_and_data_prepare_read_a_directory_alike(tmp_path):
    """One reader: the same documents (.ndjson as JSON lines, bad bytes replaced) for both."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (d / "b.ndjson").write_text('{"text": "first record"}\n{"text": "second"}\n{broken\n')
    (d / "c.txt").write_text("plain text\n")
    report = ReadReport()
    texts = list(sources.iter_texts([str(d)], report=report))
    data_report = ReadReport()
    docs = [doc.text for doc in iter_documents([str(d)], report=data_report)]
    assert texts == docs == ["first record", "second", "plain text\n", "caf\ufffd au lait\n"]
    assert report.summary() == data_report.summary()
    assert (report.malformed, report.decode_errors) == (1, 1)


def _stdlib_split(n_train_bytes: int, n_test_bytes: int) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out sets of stdlib sources (different files)."""
    files = sorted(p for p in STDLIB.glob("*.py"))
    train_texts, test_texts, size = [], [], 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        if i % 5 == 0 and sum(map(len, test_texts)) < n_test_bytes:
            test_texts.append(text)
        elif size < n_train_bytes:
            train_texts.append(text)
            size += len(text)
    return train_texts, test_texts


@pytest.mark.slow
def test_compression_within_one_percent_of_hf_tokenizers():
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    train_texts, test_texts = _stdlib_split(3_000_000, 600_000)
    vocab_size = 4096
    ours = train_tokenizer(train_texts, vocab_size=vocab_size, workers=2)

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(ours.special_tokens))
    hf.train_from_iterator(train_texts, trainer)
    assert hf.get_vocab_size() == ours.vocab_size

    ours_tokens = sum(len(ids) for ids in ours.encode_batch(test_texts))
    hf_tokens = sum(len(e.ids) for e in hf.encode_batch(test_texts))
    assert ours_tokens <= 1.01 * hf_tokens, (ours_tokens, hf_tokens)
