"""The chat format: a conversation as token ids plus a loss mask, and a prompt for generation.

A conversation in the OpenAI shape, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
becomes one token sequence:

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

`<|endoftext|>` opens it the way it separates pre-training documents, so the model starts from a
clean state. Each turn is its role token, its content encoded as plain text, and `<|end|>`. The loss
mask is 1 exactly on the assistant turns' content tokens and their `<|end|>` (the model learns to
answer and to stop, never to predict what the user will say). A prompt for generation is the same
rendering of the turns so far followed by `<|assistant|>`.

Calculator calls. In an assistant turn, `<|tool|>expression<|/tool|>` are the tool tokens around
an arithmetic expression, and the text right after the call is its result as the engine injects it
(`lmforge.calculator.calculate`, or "error"), then the answer goes on:

    <|tool|>1234 + 567<|/tool|>1801
    #### 1801

The pieces are encoded one by one exactly as `lmforge.engine.Engine` produces them at generation
time: the text before the call, the tool tokens, the expression, `tokenizer.encode(result)`, the
rest. The result's tokens are masked out of the loss (the engine writes them, the model does not),
the call itself is learned. A result that differs from the calculator's is an error in training
data (`render_conversation`); a prompt (`render_prompt`, a chat history) takes such text as written.

Content is always encoded as plain text: a user typing `<|assistant|>` gets the bytes of that
string, never the control token, so no message can forge a turn. (Hugging Face tokenizers cannot do
this: their `apply_chat_template` reads special-token spellings in content as the tokens.)
`CHAT_TEMPLATE` is the same format in Jinja for `tokenizer_config.json`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lmforge.errors import UserError

BOS = "<|endoftext|>"
END = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_TOKENS = (BOS, *ROLE_TOKENS.values(), END)
# A calculator call in an assistant turn: the model writes `<|tool|>expression<|/tool|>` and the
# engine appends the result as forced tokens (see the module docstring).
TOOL_TOKENS = ("<|tool|>", "<|/tool|>")
_TOOL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TOOL_TOKENS) + ")")

Message = Mapping[str, str]

# The format above in Jinja, for `transformers`' `apply_chat_template` (one line: no whitespace
# leaks into the output whatever the Jinja whitespace settings are).
CHAT_TEMPLATE = (
    "{{- '" + BOS + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '" + END + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ROLE_TOKENS["assistant"] + "' -}}{%- endif -%}"
)


def require_chat_tokens(tokenizer, what: str = "tokenizer") -> dict[str, int]:
    """The ids of the chat tokens; a UserError naming the missing ones if `tokenizer` lacks any."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise UserError(
            f"{what} lacks the chat tokens: {', '.join(missing)} (train a tokenizer with the default "
            "tokenizer.special_tokens, which include them)"
        )
    return {t: tokenizer.special_tokens[t] for t in CHAT_TOKENS}


def validate_messages(messages: Sequence[Message], need_assistant: bool = True) -> None:
    """UserError naming the problem: not a list of {role, content}, an unknown role, an empty
    conversation, a system turn that is not first, or (when `need_assistant`) no assistant turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise UserError(f"a conversation must be a list of messages, not {type(messages).__name__}")
    if not messages:
        raise UserError("empty conversation: it has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLE_TOKENS:
            raise UserError(f"message {i} has unknown role {m['role']!r} "
                            f"(expected one of {', '.join(ROLE_TOKENS)})")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i} ({m['role']}) content must be a string, "
                            f"not {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise UserError(f"message {i} is a system message; only the first message may be one")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn: nothing to learn from")


def render_conversation(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (1 on assistant content and its
    `<|end|>`, except calculator results; 0 elsewhere), of the same length."""
    validate_messages(messages)
    return _render(tokenizer, messages, strict=True)


def render_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids that ask the model for the next assistant turn: the conversation so far and
    `<|assistant|>`. The last message must not be an assistant turn."""
    validate_messages(messages, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise UserError("the conversation already ends with an assistant turn: nothing to prompt for")
    ids, _ = _render(tokenizer, messages, strict=False)
    return ids + [tokenizer.special_tokens[ROLE_TOKENS["assistant"]]]


def encode_assistant(tokenizer, content: str, strict: bool = True) -> tuple[list[int], list[int]]:
    """An assistant turn's content as the engine generates it, with its loss mask: 1 on what the
    model writes, 0 on calculator results. Without tool tokens in the tokenizer (or in `content`)
    it is `tokenizer.encode(content)`, all learned. `strict`: a call followed by text that is not
    the calculator's result is a UserError (else that text counts as the model's)."""
    specials = tokenizer.special_tokens
    if not all(t in specials for t in TOOL_TOKENS) or TOOL_TOKENS[0] not in content:
        ids = tokenizer.encode(content)
        return ids, [1] * len(ids)
    ids: list[int] = []
    mask: list[int] = []
    expression: list[str] | None = None  # the open call's text so far (the engine's tool_start)
    result: str | None = None  # the closed call's value, due at the start of the next text
    pieces = _TOOL_SPLIT.split(content)  # text, token, text, token, ..., text
    for i, piece in enumerate(pieces):
        if i % 2:  # split() puts the tool tokens at the odd places
            ids.append(specials[piece])
            mask.append(1)
            if piece == TOOL_TOKENS[0]:
                expression = []  # a second opening restarts the expression, as in the engine
            elif expression is not None:
                result, expression = _tool_result("".join(expression)), None
            continue
        if expression is not None:
            expression.append(piece)
        if result is not None:
            piece = _take_result(piece, result, i == len(pieces) - 1, strict, ids, mask, tokenizer)
            result = None
        text = tokenizer.encode(piece)
        ids += text
        mask += [1] * len(text)
    return ids, mask


def _tool_result(expression: str) -> str:
    """What the engine injects after `<|tool|>expression<|/tool|>`."""
    from lmforge.calculator import CalculatorError, calculate

    try:
        return calculate(expression)
    except CalculatorError:
        return "error"


def _take_result(text: str, result: str, last: bool, strict: bool, ids: list[int], mask: list[int],
                 tokenizer) -> str:
    """Append the injected `result` (masked) that `text` starts with; return the text after it.
    A `last` text that is all a prefix of `result` is an answer that ended while the result was
    being injected (at max_tokens): it is the engine's too."""
    if text.startswith(result) or (last and result.startswith(text)):
        injected = tokenizer.encode(text[:len(result)])
        ids += injected
        mask += [0] * len(injected)
        return text[len(result):]
    if strict:
        raise UserError(f"an assistant message calls the calculator, which answers {result!r}, but the "
                        f"text after the call is {text[:30]!r}: write the result right after <|/tool|>")
    return text


def _render(tokenizer, messages: Sequence[Message], strict: bool) -> tuple[list[int], list[int]]:
    special = require_chat_tokens(tokenizer)
    ids, mask = [special[BOS]], [0]
    for m in messages:
        if m["role"] == "assistant":
            content, learn = encode_assistant(tokenizer, m["content"], strict)
        else:  # plain text: special-token spellings stay text
            content = tokenizer.encode(m["content"])
            learn = [0] * len(content)
        ids += [special[ROLE_TOKENS[m["role"]]], *content, special[END]]
        mask += [0, *learn, int(m["role"] == "assistant")]
    return ids, mask
