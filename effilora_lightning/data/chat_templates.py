"""Conversation templates of visual instruction tuning: how a LLaVA conversation is laid out as text.

vicuna_v1 is LLaVA-1.5's ``conv_vicuna_v1``; llama3 is the LLaMA-3 chat format (the LLaVA reference has none).
The text each one renders, and the rules that change tokens, are in ``conversation``'s module docstring.
A template's special tokens must be single ids of the tokenizer (``check_template``): a LLaMA-3 template
needs a LLaMA-3 tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LLAMA3", "TEMPLATES", "VICUNA_V1", "ConversationTemplate", "check_template", "get_template",
           "special_id"]


@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation is laid out as text. `{system}` and `{message}` are the only placeholders."""

    name: str
    system: str
    """System prompt; "" leaves the system block out."""
    system_format: str
    """The system block, before the first user turn."""
    user_format: str
    """One user turn, up to and including the assistant header (the generation prompt ends here)."""
    assistant_format: str
    """One assistant reply, before its end-of-turn token."""
    end_of_turn: str | None = None
    """Token closing an assistant reply, trained on; None means the tokenizer's eos."""
    special_tokens: tuple[str, ...] = ()
    """Strings in the formats that must map to one special token id each."""
    trim_messages: bool = False
    """Strip leading/trailing whitespace of every message (LLaMA-3's chat format does)."""

    def end_token(self, tokenizer: Any) -> str:
        """The end-of-turn token string for this tokenizer (also the stop token for generation)."""
        token = self.end_of_turn if self.end_of_turn is not None else tokenizer.eos_token
        if token is None:
            raise ValueError(f"template {self.name!r} ends turns with the eos token, but the tokenizer has none")
        return token


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=(  # LLaVA's conv_vicuna_v1 (`--version v1`, `--conv-mode vicuna_v1`); conv_llava_v1 says "human"
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    system_format="{system} ",
    user_format="USER: {message} ASSISTANT:",
    assistant_format=" {message}",
)

LLAMA3 = ConversationTemplate(
    name="llama3",
    system=(
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language."
    ),
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format=(
        "<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant_format="{message}",
    end_of_turn="<|eot_id|>",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    trim_messages=True,
)

TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (VICUNA_V1, LLAMA3)}


def get_template(name: str) -> ConversationTemplate:
    """The template registered under `name`, or a ValueError listing the choices."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_template(template: ConversationTemplate, tokenizer: Any) -> None:
    """Fail early when the tokenizer cannot express the template's special tokens as single ids."""
    for token in (*template.special_tokens, template.end_token(tokenizer)):
        special_id(tokenizer, token, template)


def special_id(tokenizer: Any, token: str, template: ConversationTemplate) -> int:
    """Id of a special token string, refusing tokens the tokenizer does not know."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"template {template.name!r} needs the special token {token!r}, which the tokenizer does not have; "
            f"use the template that matches the tokenizer (llama3 for LLaMA-3, vicuna_v1 otherwise)"
        )
    return token_id
