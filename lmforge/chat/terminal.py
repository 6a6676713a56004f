"""`lmforge chat`: talk to a checkpoint in the terminal, or answer one `--prompt` for scripts.

The conversation is kept as OpenAI-style messages and rendered with the chat format for every
turn; when it outgrows the model's context the oldest turns are dropped (the system prompt stays).
Answers stream as the engine produces them. Ctrl-C stops the answer being written (what was
written stays in the history), not the program; /quit or Ctrl-D ends it. With `--best-of N
--reward RM` each turn samples N answers at once and shows the one the reward model scores highest
(lmforge/align/reward.py), whole rather than streamed.

Input: a line is a message; a line ending with a backslash continues on the next line.
Commands: /reset, /system TEXT (empty: none), /temperature T, /quit, /help.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from lmforge.errors import UserError

HELP = ("commands: /reset (new conversation), /system TEXT (set the system prompt, empty: none), "
        "/temperature T, /quit; end a line with \\ to continue it; Ctrl-C stops an answer")


def chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory (with its tokenizer/), or a run directory")
    parser.add_argument("--system", default="", metavar="TEXT", help="the system prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--seed", type=int, help="seed of the first answer (then seed + turn)")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="answer this one message, print the answer and exit (for scripts)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step (default: on CPU for an interactive chat, "
                             "not for --prompt; the first compile takes tens of seconds)")
    parser.add_argument("--best-of", type=int, default=1, metavar="N",
                        help="sample N answers and show the one --reward scores highest")
    parser.add_argument("--reward", metavar="RM", help="a reward model (lmforge reward train) for --best-of")


class Conversation:
    """The chat state and one answer at a time through the engine (stepped in this thread)."""

    def __init__(self, engine, system: str, temperature: float, top_p: float, max_tokens: int,
                 seed: int | None, best_of: int = 1, reward=None) -> None:
        self.engine, self.system, self.temperature = engine, system, temperature
        self.top_p, self.max_tokens, self.seed = top_p, max_tokens, seed
        self.best_of, self.reward = best_of, reward  # N answers, the reward model's favourite shown
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `text` through `write`; Ctrl-C cuts it short. Returns it."""
        from lmforge.chat import render_prompt
        from lmforge.engine import SamplingParams

        self.turns.append({"role": "user", "content": text})
        context = self.engine.cfg.max_seq_len
        prompt = render_prompt(self.engine.tokenizer, self.messages())
        while len(prompt) + 1 > context - min(self.max_tokens, context // 2) and len(self.turns) > 1:
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]  # oldest exchange
            prompt = render_prompt(self.engine.tokenizer, self.messages())
        if len(prompt) >= context:
            self.turns.pop()
            raise UserError(f"the message is {len(prompt)} tokens with the chat format; the model's "
                            f"context is {context}")
        params = SamplingParams(max_tokens=min(self.max_tokens, context - len(prompt)),
                                temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.seed is not None:
            self.seed += 1
        if self.best_of > 1:
            return self._best_of(prompt, params, write)
        pieces: list[str] = []

        def show(event) -> None:
            if isinstance(event, BaseException):
                raise event
            pieces.append(event.text)
            write(event.text)

        request = self.engine.submit(prompt, params, on_event=show)
        try:
            while self.engine.step():
                pass
        except KeyboardInterrupt:
            request.cancel()
            while self.engine.step():  # drop its rows
                pass
            write(" [stopped]")
        reply = "".join(pieces)
        self.turns.append({"role": "assistant", "content": reply})
        return reply

    def _best_of(self, prompt: list[int], params, write: Callable[[str], None]) -> str:
        """Sample best_of answers at once, show the one the reward model scores highest."""
        params.n = self.best_of
        request = self.engine.submit(prompt, params, stream=False)
        while self.engine.step():
            pass
        answers = [c.text for c in request.result()]
        scores = self.reward.score([self.messages()] * len(answers), answers)
        reply = answers[max(range(len(answers)), key=scores.__getitem__)]
        write(reply)
        self.turns.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str, say: Callable[[str], None]) -> bool:
        """Run a /command; False when it asks to quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            say("(new conversation)")
        elif name == "/system":
            self.system, self.turns = rest, []
            say(f"(system prompt {'set' if rest else 'removed'}; new conversation)")
        elif name == "/temperature":
            try:
                value = float(rest)
            except ValueError:
                value = -1.0
            if value < 0:
                say(f"(temperature must be a number >= 0, got {rest!r})")
            else:
                self.temperature = value
                say(f"(temperature {value:g})")
        else:
            say(HELP)
        return True


def chat_command(args: argparse.Namespace) -> int:
    from lmforge.chat import require_chat_tokens
    from lmforge.engine import load_engine

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1] and --max-tokens >= 1")
    if args.best_of < 1 or (args.best_of > 1) != (args.reward is not None):
        raise UserError("--best-of N (N > 1) and --reward RM go together: N answers, the reward model picks")
    compile = args.compile if args.compile is not None else args.prompt is None and args.device == "cpu"
    engine, name = load_engine(args.checkpoint, args.device, max_batch=args.best_of, compile=compile)
    require_chat_tokens(engine.tokenizer, f"the tokenizer of {name}")
    reward = None
    if args.reward:
        from lmforge.align.reward import load_reward_model

        reward = load_reward_model(args.reward, args.device)
    if compile:
        # On stderr: stdout holds the conversation (or, with --prompt, just the answer).
        print("(compiling the decode step...)", end="", file=sys.stderr, flush=True)
        print(f"\r(compiled the decode step in {engine.warm_up():.1f} s)", file=sys.stderr, flush=True)
    chat = Conversation(engine, args.system, args.temperature, args.top_p, args.max_tokens, args.seed,
                        args.best_of, reward)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        chat.answer(args.prompt, write)
        write("\n")
        return 0
    # Ctrl-C must reach us even when started with SIGINT ignored (a shell's background job without
    # job control hands that on, and Python then installs no handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"chatting with {name}; /help for commands, /quit or Ctrl-D to leave")
    while True:
        try:
            line = read_message()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, keep chatting
            print()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line.strip(), print):
                return 0
            continue
        write("assistant> ")
        try:
            chat.answer(line, write)
        except UserError as error:
            write(f"({error})")
        write("\n")


def read_message() -> str:
    """One message from the terminal: lines ending with a backslash continue it."""
    lines = [input("you> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("...  "))
    return "\n".join(lines)
