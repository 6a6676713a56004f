"""The chat format: a conversation as token ids plus a loss mask, and a prompt for generation.

A conversation in the OpenAI shape, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
becomes one token sequence:

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

`<|endoftext|>` opens it the way it separates pre-training documents, so the model starts from a
clean state. Each turn is its role token, its content encoded as plain text, and `<|end|>`. The loss
mask is 1 exactly on the assistant turns' content tokens and their `<|end|>` (the model learns to
answer and to stop, never to predict what the user will say). A prompt for generation is the same
rendering of the turns so far followed by `<|assistant|>`.

Content is always encoded as plain text: a user typing `<|assistant|>` gets the bytes of that
string, never the control token, so no message can forge a turn. (Hugging Face tokenizers cannot do
this: their `apply_chat_template` reads special-token spellings in content as the tokens.)
`CHAT_TEMPLATE` is the same format in Jinja for `tokenizer_config.json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lmforge.errors import UserError

BOS = "<|endoftext|>"
END = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_TOKENS = (BOS, *ROLE_TOKENS.values(), END)
# Reserved for a tool (a calculator): the model writes `<|tool|>expression<|/tool|>` and the
# generator appends the result as forced text. Not used by the format yet.
TOOL_TOKENS = ("<|tool|>", "<|/tool|>")

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
    `<|end|>`, 0 elsewhere), of the same length."""
    validate_messages(messages)
    return _render(tokenizer, messages)


def render_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids that ask the model for the next assistant turn: the conversation so far and
    `<|assistant|>`. The last message must not be an assistant turn."""
    validate_messages(messages, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise UserError("the conversation already ends with an assistant turn: nothing to prompt for")
    ids, _ = _render(tokenizer, messages)
    return ids + [tokenizer.special_tokens[ROLE_TOKENS["assistant"]]]


def _render(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    special = require_chat_tokens(tokenizer)
    ids, mask = [special[BOS]], [0]
    for m in messages:
        content = tokenizer.encode(m["content"])  # plain text: special-token spellings stay text
        learn = int(m["role"] == "assistant")
        ids += [special[ROLE_TOKENS[m["role"]]], *content, special[END]]
        mask += [0] + [learn] * (len(content) + 1)
    return ids, mask
