"""Chat: the conversation format shared by fine-tuning, evaluation, alignment and serving.

    from lmforge.chat import render_conversation, render_prompt
    ids, loss_mask = render_conversation(tok, [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello!"}])
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi"}])  # ends at <|assistant|>
"""

from lmforge.chat.format import (
    CHAT_TEMPLATE,
    CHAT_TOKENS,
    TOOL_TOKENS,
    encode_assistant,
    render_conversation,
    render_prompt,
    require_chat_tokens,
    validate_messages,
)

__all__ = ["CHAT_TEMPLATE", "CHAT_TOKENS", "TOOL_TOKENS", "encode_assistant", "render_conversation", "render_prompt",
           "require_chat_tokens", "validate_messages"]
