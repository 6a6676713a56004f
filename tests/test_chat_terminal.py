"""`lmforge chat`: the --prompt mode in a subprocess, the interactive mode in a pseudo-terminal.

Truth for the answers: the batch-1 `generate` path on the same checkpoint (greedy)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_fixtures import tiny_chat_checkpoint

from lmforge.chat import render_prompt
from lmforge.engine import generate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("chat"), n_layers=4, context=4096)


def greedy_answer(checkpoint, messages, max_tokens) -> str:
    _, tok, model = checkpoint
    prompt = render_prompt(tok, messages)
    out = generate(model, torch.tensor([prompt]), max_tokens, temperature=0,
                   vocab_limit=tok.vocab_size)[0, len(prompt):].tolist()
    return tok.decode(out)


def on_terminal(answer: str) -> str:
    """What the terminal shows of an answer and the newline after it (the tty writes \\n as \\r\\n)."""
    return (answer + "\n").replace("\n", "\r\n")


def chat_cmd(checkpoint, *args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "chat", "--checkpoint", str(checkpoint[0]), "--no-compile",
            "--temperature", "0", *args]


@contextlib.contextmanager
def chat_terminal(checkpoint, *args: str) -> Iterator[Any]:
    """`lmforge chat ARGS` in a pseudo-terminal (a pexpect child), at its first prompt; when the
    test is done with it, /quit must end it with exit status 0."""
    pexpect = pytest.importorskip("pexpect")
    cmd = chat_cmd(checkpoint, *args)
    child = pexpect.spawn(cmd[0], cmd[1:], env=ENV, encoding="utf-8", timeout=60)
    try:
        child.expect_exact("you> ")
        yield child
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_prompt_mode_prints_the_answer(checkpoint):
    done = subprocess.run(chat_cmd(checkpoint, "--system", "Be brief.", "--max-tokens", "12",
                                   "--prompt", "Hi there"),
                          env=ENV, capture_output=True, timeout=120)  # bytes: \r stays \r
    assert done.returncode == 0, done.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert done.stdout.decode() == greedy_answer(checkpoint, messages, 12) + "\n"


def test_prompt_mode_bad_flags_are_one_line(checkpoint):
    done = subprocess.run(chat_cmd(checkpoint, "--top-p", "3", "--prompt", "x"),
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_interactive_chat_in_a_terminal(checkpoint):
    with chat_terminal(checkpoint, "--max-tokens", "8") as child:
        child.sendline("Hello")
        first = greedy_answer(checkpoint, [{"role": "user", "content": "Hello"}], 8)
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        assert child.before == on_terminal(first)
        # History: the second answer continues the conversation; a multi-line message.
        child.sendline("two \\")
        child.expect_exact("...  ")
        child.sendline("lines")
        history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "two \nlines"}]
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        second = greedy_answer(checkpoint, history, 8)
        assert child.before == on_terminal(second)
        child.sendline("/temperature abc")
        child.expect_exact("temperature must be a number")
        child.sendline("/system Be kind.")
        child.expect_exact("system prompt set")
        child.sendline("/reset")
        child.expect_exact("new conversation")
        child.expect_exact("you> ")


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """A deeper random model: its 4,000-token answer takes seconds even on a fast machine, so the
    Ctrl-C below lands while it streams (with 4 layers the answer could end before it arrived)."""
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("deep-chat"), n_layers=32, context=4096)


def test_ctrl_c_stops_the_answer_not_the_program(deep_checkpoint):
    with chat_terminal(deep_checkpoint, "--max-tokens", "4000") as child:  # many seconds of answer
        child.sendline("Talk for a long time")
        child.expect_exact("assistant> ")
        child.expect(r"\S")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("you> ")
