"""Letter counting and spelling: questions a subword model gets wrong unless it learns to spell."""

from __future__ import annotations

import hashlib

from lmforge.tasks.common import Example, Task, conversation, final_number

WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon melon grape peach plum pear
mountain river forest desert ocean island valley meadow castle bridge garden window kitchen
library hospital museum theatre station village harbour lantern candle mirror pillow blanket
letter number pencil paper notebook teacher student doctor sailor soldier farmer baker butcher
elephant giraffe kangaroo penguin dolphin octopus butterfly squirrel rabbit tortoise sparrow
computer keyboard program function variable compiler parser iterator generator dictionary
summer winter autumn spring morning evening midnight thunder lightning rainbow weather shadow
kingdom prince princess shepherd merchant pilgrim prophet tempest comedy tragedy sonnet
question answer balloon coffee committee address success occasion necessary embarrass mississippi
bookkeeper bubble puzzle jazz pizza yellow hello little bottle middle apprentice assessment
""".split()


class Letters(Task):
    name = "letters"

    def pool(self) -> list[Example]:
        """Per word: its spelling, a count question for every letter it repeats, as many for
        letters it has once, and (every other word) one for a letter it lacks. Asking about every
        letter of a word made 87% of the counts 1 (most letters of a word occur once): a model
        that always answered 1 scored 70% without counting."""
        out = []
        for word in WORDS:
            spelled = "-".join(word)
            out.append(Example(self.name, conversation(
                f"Spell the word '{word}' letter by letter.", spelled), spelled, f"spell:{word}"))
            for letter in _count_letters(word):
                out.append(_count_question(self.name, word, letter))
        return out

    def check(self, example: Example, answer_text: str) -> bool:
        if example.key.startswith("spell:"):
            letters = [c for c in answer_text.lower() if c.isalpha()]
            return "".join(letters) == example.answer.replace("-", "")
        return final_number(answer_text) == example.answer

    def check_work(self, example: Example, answer_text: str) -> bool:
        """A count is right by its working only with the reference's spelling and positions (the
        answer's wording is fixed, so that is the reference itself): a small model's right counts
        are mostly guesses after a wrong spelling or wrong positions."""
        if example.key.startswith("spell:"):
            return self.check(example, answer_text)
        return " ".join(answer_text.split()) == " ".join(example.reference.split())


def _count_letters(word: str) -> list[str]:
    """The letters asked about in `word`: each repeated one, as many of its single ones (at least
    one), and for every other word of the list one letter it does not contain - an even spread of
    answers 0, 1 and 2+, chosen deterministically (by a hash, the same on every machine)."""
    repeated = sorted(c for c in set(word) if word.count(c) > 1)
    single = sorted((c for c in set(word) if word.count(c) == 1), key=lambda c: _rank(word, c))
    chosen = repeated + single[:max(1, len(repeated))]
    if _rank(word, "") % 2 == 0:
        absent = sorted((c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word), key=lambda c: _rank(word, c))
        chosen.append(absent[0])
    return sorted(chosen)


def _rank(word: str, letter: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{word}:{letter}".encode()).digest()[:8], "big")


def _count_question(task: str, word: str, letter: str) -> Example:
    spelled = "-".join(word)
    count = word.count(letter)
    where = ", ".join(str(i + 1) for i, c in enumerate(word) if c == letter)
    plural = "time" if count == 1 else "times"
    found = (f"is at position(s) {where}, so it appears {count} {plural}" if count
             else "is not among them, so it appears 0 times")
    answer = f"Spelled out: {spelled}. The letter '{letter}' {found}.\n#### {count}"
    question = f"How many times does the letter '{letter}' appear in '{word}'?"
    return Example(task, conversation(question, answer), str(count), f"count:{word}:{letter}")
