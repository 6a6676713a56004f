"""The calculator tool: arithmetic only, bounded, and the engine's forced result tokens."""

from __future__ import annotations

import pytest
import torch

from lmforge.calculator import MAX_CHARS, CalculatorError, calculate


@pytest.mark.parametrize("expression, value", [
    ("12*7", "84"), ("2**10", "1024"), ("(1 + 2) / 4", "0.75"), ("7 // 2", "3"), ("-3 % 5", "2"),
    ("1/3", "0.333333333333"), ("-(4 - 10) * +2", "12"), ("2.5 * 4", "10"), ("10 ** -2", "0.01"),
    (" 123456789 * 987654321 ", str(123456789 * 987654321)),
])
def test_arithmetic_is_evaluated(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "x + 1", "abs(-1)", "(1).real", "1 if 1 else 2", "'a' * 3",
    "[1, 2]", "1 < 2", "lambda: 1", "True + 1", "2 ** 100000", "9 ** 9 ** 9", "10 ** 99 * 10 ** 99",
    "1 / 0", "5 % 0", "(-1) ** 0.5", "1e308 * 10", "-" * 40 + "1", "1 +", "",
    "1" * (MAX_CHARS + 1),
])
def test_everything_else_is_refused(expression):
    with pytest.raises(CalculatorError):
        calculate(expression)


def test_the_engine_forces_the_result_after_a_tool_call():
    from test_engine import tiny_model

    from lmforge.engine import TOOL_TOKENS, Engine, SamplingParams, _Sequence
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["just some text to train on 12*7"], vocab_size=300, workers=1)
    engine = Engine(tiny_model(tok), tok)
    request = engine.submit([1], SamplingParams(max_tokens=50, temperature=0))
    seq = _Sequence(request, 0)
    open_id, close_id = (tok.special_tokens[t] for t in TOOL_TOKENS)
    wanted = [open_id, *b"12*7", close_id] + [ord("x")] * 3  # what the "model" would pick
    for token in wanted:
        logits = torch.full((1, tok.vocab_size), -10.0)
        logits[0, token] = 10.0
        engine._sample([seq], logits)
    assert seq.text == "<|tool|>12*7<|/tool|>84x"  # two forced tokens (84) replaced two picks
    refused = _Sequence(request, 0)
    for token in [open_id, *b"abs(1)", close_id, ord("x")]:
        logits = torch.full((1, tok.vocab_size), -10.0)
        logits[0, token] = 10.0
        engine._sample([refused], logits)
    assert refused.text.startswith("<|tool|>abs(1)<|/tool|>e")  # "error", forced


def test_without_stream_the_forced_tokens_come_in_events_of_their_own():
    """What GRPO reads of a rollout: each event's tokens and whether they were forced. A request
    without `stream` sends a run of tokens an event, with the same tokens and flags."""
    from test_engine import tiny_model

    from lmforge.engine import TOOL_TOKENS, Engine, SamplingParams, _Sequence
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["just some text to train on 12*7"], vocab_size=300, workers=1)
    engine = Engine(tiny_model(tok), tok)
    open_id, close_id = (tok.special_tokens[t] for t in TOOL_TOKENS)
    runs = []
    for stream in (True, False):
        request = engine.submit([1], SamplingParams(max_tokens=9, temperature=0), stream=stream)
        seq = _Sequence(request, 0)
        for token in [open_id, *b"12*7", close_id] + [ord("x")] * 3:
            logits = torch.full((1, tok.vocab_size), -10.0)
            logits[0, token] = 10.0
            engine._sample([seq], logits)
        events = []
        while not request._events.empty():
            events.append(request._events.get())
        runs.append(events)
    streamed, whole = runs
    flags = [[e.forced] * len(e.token_ids) for e in streamed]
    assert [f for e in whole for f in [e.forced] * len(e.token_ids)] == [f for fs in flags for f in fs]
    assert [t for e in whole for t in e.token_ids] == [t for e in streamed for t in e.token_ids]
    assert [e.forced for e in whole] == [False, True, False]  # "84" forced between two sampled runs
    assert "".join(e.text for e in whole) == "".join(e.text for e in streamed) == "<|tool|>12*7<|/tool|>84x"
    assert whole[-1].finish_reason == streamed[-1].finish_reason == "length"
