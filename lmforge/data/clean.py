"""Text cleaning: the same characters always become the same code points and whitespace.

Unicode normalisation (NFC by default, so "é" is one code point however it was typed), line
endings to "\\n", control and invisible format characters removed (tab and newline kept), trailing
spaces stripped, runs of blank lines collapsed to one, and the text trimmed. Indentation is kept,
so code stays valid.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline, plus invisible characters that only confuse
# tokenizers: zero-width space/joiners, word joiner, byte-order mark, soft hyphen.
_DELETE = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F,
                             *range(0x80, 0xA0), 0x00AD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF]}
_TRAILING_SPACE = re.compile(r"[ \t\u00a0\u3000]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str, unicode_form: str = "NFC") -> str:
    """Normalise Unicode, line endings, control characters and whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = text.translate(_DELETE)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n ").rstrip()
