"""SFT data: the three record shapes, Parquet, mixtures, the held-out split, malformed input, the
overlong count, and batches whose per-example loss equals the loss of each example alone."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from lmforge.chat import render_conversation
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.finetune.data import (
    IGNORE,
    Source,
    collate,
    iter_batches,
    load_sft_data,
    parse_source,
    read_conversations,
    render_examples,
)
from lmforge.tasks import MIXTURE
from lmforge.tasks.arithmetic import Arithmetic
from lmforge.tokenizer import train_tokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
     {"role": "assistant", "content": f"{i}."}, {"role": "user", "content": "Again?"},
     {"role": "assistant", "content": f"{i}, again."}]
    for i in range(40)
]


def as_sharegpt(messages):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["Say 1. Again? Be brief. " * 20, "What is 3 + 4? #### 7"], vocab_size=300,
                           workers=1)


def test_openai_sharegpt_and_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    openai = write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in CONVERSATIONS])
    sharegpt = write_jsonl(tmp_path / "b.jsonl", [as_sharegpt(c) for c in CONVERSATIONS])
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([as_sharegpt(c) for c in CONVERSATIONS]), parquet)
    for path in (openai, sharegpt, parquet):
        assert read_conversations(path).conversations == CONVERSATIONS


def test_sharegpt_with_a_top_level_system_prompt(tmp_path):
    record = as_sharegpt(CONVERSATIONS[0][1:])
    record["system"] = CONVERSATIONS[0][0]["content"]
    path = write_jsonl(tmp_path / "s.jsonl", [record])
    assert read_conversations(path).conversations == [CONVERSATIONS[0]]


def test_alpaca_records(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    assert read_conversations(path).conversations == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    ]


BAD_LINES = [
    ("{not json", "not a JSON line"),
    ('{"text": "a pre-training record"}', "expected \"messages\""),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "unknown ShareGPT speaker"),
    ("[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("bad, problem", BAD_LINES)
def test_malformed_record_names_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n" + bad + "\n")
    with pytest.raises(UserError, match=problem) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and "\n" not in str(err.value)
    lenient = read_conversations(path, strict=False)
    assert (lenient.conversations, lenient.skipped) == ([CONVERSATIONS[0]], 1)


def test_a_file_that_is_not_jsonl(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"model\.bin:1: not a JSON line"):
        read_conversations(path)
    with pytest.raises(UserError, match="no conversations in it"):
        read_conversations(path, strict=False)
    with pytest.raises(UserError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("spec, source", [
    ("a.jsonl", Source("a.jsonl")), ("a.jsonl:3", Source("a.jsonl", 3.0)),
    ("builtin:chat", Source("builtin:chat")), ("builtin:chat:0.5", Source("builtin:chat", 0.5)),
    ("dir/x:y.jsonl", Source("dir/x:y.jsonl")),
])
def test_source_syntax(spec, source):
    assert parse_source(spec) == source


def test_source_weight_must_be_positive():
    with pytest.raises(UserError, match="positive"):
        parse_source("a.jsonl:0")


def test_mixture_weights_and_held_out_split(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in CONVERSATIONS])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": c} for c in CONVERSATIONS[:10]])
    one = load_sft_data([str(a)], val_fraction=0.2)
    assert one.val and len(one.train) + len(one.val) == 40
    assert not {json.dumps(c) for c in one.train} & {json.dumps(c) for c in one.val}
    mixed = load_sft_data([f"{a}:0.5", f"{b}:3"], val_fraction=0.2, seed=1)
    b_train = [c for c in CONVERSATIONS[:10] if c not in one.val]
    assert len(mixed.train) == round(0.5 * len(one.train)) + 3 * len(b_train)
    assert all(c not in mixed.train for c in one.val)  # held out whatever the mixture
    assert load_sft_data([f"{a}:0.5", f"{b}:3"], val_fraction=0.2, seed=1).train == mixed.train


def test_builtin_chat_source_uses_the_test_split_for_validation():
    tasks = {name: Arithmetic() for name in MIXTURE}  # a stand-in needing no corpus archives
    data = load_sft_data(["builtin:chat:2"], builtin_examples=50, val_fraction=0.2, tasks=tasks)
    questions = [{c[0]["content"] for c in part} for part in (data.train, data.val)]
    assert len(data.train) >= 100 and data.val and not questions[0] & questions[1]


def test_builtin_arithmetic_source():
    data = load_sft_data(["builtin:arithmetic:2"], builtin_examples=50, val_fraction=0.2)
    questions = [{c[0]["content"] for c in part} for part in (data.train, data.val)]
    assert len(data.train) == 100 and len(data.val) == 10 and not questions[0] & questions[1]
    assert all("<|tool|>" in c[-1]["content"] for c in data.train)


def test_overlong_conversations_are_counted(tok):
    short = CONVERSATIONS[0]
    long = [{"role": "user", "content": "Say 1. " * 200}, {"role": "assistant", "content": "1."}]
    tail_long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Say 1. " * 200}]
    context = len(render_conversation(tok, short)[0]) + 5
    kept, stats = render_examples(tok, [short, long, tail_long], context, "truncate")
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)  # `long` has nothing left
    assert all(len(ids) <= context + 1 for ids, _ in kept)
    _, stats = render_examples(tok, [short, long, tail_long], context, "drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 2)
    assert "0 truncated and 2 dropped" in stats.describe()


def test_batches_are_right_padded_with_ignored_targets(tok):
    examples, _ = render_examples(tok, CONVERSATIONS[:5] + [CONVERSATIONS[5][:3]], 256)
    inputs, targets = collate(examples, tok.pad_id)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        assert (inputs[row, n:] == tok.pad_id).all() and (targets[row, n:] == IGNORE).all()
        learned = [t for t, m in zip(ids[1:], mask[1:]) if m]
        assert targets[row][targets[row] != IGNORE].tolist() == learned


def test_an_examples_loss_is_the_same_batched_or_alone(tok):
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = Transformer(cfg).eval()
    convs = [c[: 3 + 2 * (i % 2)] for i, c in enumerate(CONVERSATIONS[:7])]  # two lengths
    examples, _ = render_examples(tok, convs, 63)

    def summed_losses(inputs, targets):
        logits = model(inputs).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                 ignore_index=IGNORE, reduction="none")
        return loss.sum(dim=1)

    with torch.no_grad():
        inputs, targets = collate(examples, tok.pad_id)  # lengths differ: rows are padded
        assert (inputs == tok.pad_id).any()
        batched = summed_losses(inputs, targets)
        for row, example in enumerate(examples):
            alone = summed_losses(*collate([example], tok.pad_id))
            assert batched[row].item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-5)


def test_bucketed_batches_cover_every_example_once_with_little_padding(tok):
    convs = [c[: 3 + 2 * (i % 2)] for i, c in enumerate(CONVERSATIONS)]
    examples, _ = render_examples(tok, convs, 63)
    rows = [tuple(x[: int((y != IGNORE).nonzero().max()) + 1].tolist())
            for inputs, targets in iter_batches(examples, 4, tok.pad_id, seed=3)
            for x, y in zip(inputs, targets)]
    assert sorted(rows) == sorted(tuple(ids[:-1]) for ids, _ in examples)
    # Sorted by length, a batch pads to at most the next length up; 40 examples in one pass.
    lengths = sorted(len(ids) - 1 for ids, _ in examples)
    pads = [sum(int(inputs.shape[1]) - int((row != tok.pad_id).sum()) for row in inputs)
            for inputs, _ in iter_batches(examples, 4, tok.pad_id, seed=3)]
    runs = [lengths[i : i + 4] for i in range(0, len(lengths), 4)]
    assert sum(pads) == sum(max(run) * len(run) - sum(run) for run in runs)


def test_text_source_gives_whole_windows_of_the_shards_with_every_target_counted(tmp_path):
    """text:SHARDS rows against the shard files read directly: each row is one window of context
    + 1 tokens at a multiple of the context in the concatenated split, round(w x windows) of them,
    every target counted (to_row turns none into IGNORE); another tokenizer's shards are refused."""
    from train_fixtures import make_shards

    from lmforge.data.loader import TokenLoader
    from lmforge.data.shards import open_shard
    from lmforge.finetune.data import text_examples, to_row
    from lmforge.tokenizer import load_tokenizer

    shards = make_shards(tmp_path)
    data = load_sft_data([f"text:{shards}:0.5"], seed=0)
    assert data.train == [] and data.text == [Source(f"text:{shards}", 0.5)]
    tokenizer = load_tokenizer(shards / "tokenizer")
    context = 16
    rows = text_examples(data.text[0], "train", context, tokenizer, seed=0)
    windows = TokenLoader(shards, "train", seq_len=context, batch_size=1).windows_per_epoch
    assert len(rows) == round(0.5 * windows)
    every = collections.Counter()  # each window of each shard, read from the files
    for path in sorted(shards.glob("train_*.bin")):
        tokens = open_shard(path).tolist()
        every.update(tuple(tokens[s:s + context + 1]) for s in range(0, len(tokens) - context, context))
    assert sum(every.values()) == windows
    taken = collections.Counter(tuple(ids) for ids, _ in rows)
    assert all(taken[w] <= every[w] for w in taken)  # windows of the files, none twice
    for ids, mask in rows:
        assert len(ids) == context + 1 and IGNORE not in to_row(ids, mask)[1]
    assert len(text_examples(data.text[0], "val", context, tokenizer, seed=0, count=3)) == 3
    other = train_tokenizer(["something else entirely " * 50], vocab_size=300, workers=1)
    with pytest.raises(UserError, match="another tokenizer"):
        text_examples(data.text[0], "train", context, other, seed=0)
    with pytest.raises(UserError, match="no token shards"):
        load_sft_data([f"text:{tmp_path / 'nothing'}"])
