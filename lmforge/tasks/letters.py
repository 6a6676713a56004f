"""Letter counting and spelling: questions a subword model gets wrong unless it learns to spell."""

from __future__ import annotations

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
        out = []
        for word in WORDS:
            spelled = "-".join(word)
            out.append(Example(self.name, conversation(
                f"Spell the word '{word}' letter by letter.", spelled), spelled, f"spell:{word}"))
            for letter in sorted(set(word)):
                count = word.count(letter)
                where = ", ".join(str(i + 1) for i, c in enumerate(word) if c == letter)
                plural = "time" if count == 1 else "times"
                answer = (f"Spelled out: {spelled}. The letter '{letter}' is at position(s) {where}, "
                          f"so it appears {count} {plural}.\n#### {count}")
                question = f"How many times does the letter '{letter}' appear in '{word}'?"
                out.append(Example(self.name, conversation(question, answer), str(count),
                                   f"count:{word}:{letter}"))
        return out

    def check(self, example: Example, answer_text: str) -> bool:
        if example.key.startswith("spell:"):
            letters = [c for c in answer_text.lower() if c.isalpha()]
            return "".join(letters) == example.answer.replace("-", "")
        return final_number(answer_text) == example.answer

