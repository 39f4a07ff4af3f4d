"""The one chat rendering: a user message as the prompt text a model is given."""

from __future__ import annotations

from typing import Any


def render(tokenizer: Any, message: str) -> str:
    """``message`` as one user turn through the tokenizer's chat template, the assistant turn opened; as is when
    the tokenizer has no template (a base model, the lab's tiny one)."""
    if not getattr(tokenizer, "chat_template", None):
        return message
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
