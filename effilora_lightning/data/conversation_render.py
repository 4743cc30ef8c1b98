"""Rendering a LLaVA conversation as template text cut into segments: text to tokenize (trained on or not),
special tokens of the template, and image placeholders. ``conversation`` tokenizes the segments.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal, NamedTuple

from effilora_lightning.data.chat_templates import ConversationTemplate

__all__ = ["IMAGE_TOKEN", "Segment", "render"]

IMAGE_TOKEN = "<image>"
"""Where an image goes in a human turn's text (LLaVA's ``DEFAULT_IMAGE_TOKEN``)."""


class Segment(NamedTuple):
    """A piece of the rendered sample: text to tokenize, a special token, or an image placeholder (a tuple:
    setup makes some ten of these per record, hundreds of thousands in all)."""

    kind: Literal["text", "special", "image"]
    text: str
    trainable: bool
    turn: int  # index of the conversation turn it belongs to (-1: bos/system)


def _move_images_to_start(message: str) -> str:
    """LLaVA's rule: every `<image>` of a turn goes to its start, each followed by a newline, and the turn is
    stripped (a turn that is only `<image>` renders without the newline)."""
    count = message.count(IMAGE_TOKEN)
    if not count:
        return message
    return ((IMAGE_TOKEN + "\n") * count + message.replace(IMAGE_TOKEN, "").strip()).strip()


@functools.lru_cache(maxsize=64)
def _format_pieces(fmt: str, specials: tuple[str, ...]) -> tuple[str, ...]:
    """A format string cut at its special tokens (cached: there are a handful of formats)."""
    if not specials:
        return (fmt,)
    return tuple(p for p in re.split("(" + "|".join(map(re.escape, specials)) + ")", fmt) if p)


def _split(fmt: str, template: ConversationTemplate, trainable: bool, turn: int, **values: str) -> list[Segment]:
    """Cut a format string at its special tokens, then fill placeholders (values never become specials)."""
    segments = []
    for piece in _format_pieces(fmt, template.special_tokens):
        if piece in template.special_tokens:
            segments.append(Segment("special", piece, trainable, turn))
            continue
        for key, value in values.items():
            piece = piece.replace("{" + key + "}", value)
        for j, part in enumerate(piece.split(IMAGE_TOKEN) if turn >= 0 and not trainable else [piece]):
            if j:
                segments.append(Segment("image", IMAGE_TOKEN, False, turn))
            if part:
                segments.append(Segment("text", part, trainable, turn))
    return segments


def render(conversations: list[dict[str, str]], template: ConversationTemplate, tokenizer: Any) -> list[Segment]:
    """Segments of the whole conversation (bos not included): system block, then user turns and trainable
    replies, each followed by its end-of-turn token."""
    def message(text: str) -> str:
        return text.strip() if template.trim_messages else text

    segments = []
    if template.system:
        segments += _split(template.system_format, template, False, -1, system=message(template.system))
    for i, turn in enumerate(conversations):
        if i % 2 == 0:
            text = message(_move_images_to_start(turn["value"]))
            segments += _split(template.user_format, template, False, i, message=text)
        else:
            segments += _split(template.assistant_format, template, True, i, message=message(turn["value"]))
            segments.append(Segment("special", template.end_token(tokenizer), True, i))
    return _coalesce(segments)


def _coalesce(segments: list[Segment]) -> list[Segment]:
    """Merge neighbouring text of the same turn and trainability, so it tokenizes as one natural string."""
    merged: list[Segment] = []
    for seg in segments:
        prev = merged[-1] if merged else None
        if prev and seg.kind == prev.kind == "text" and (seg.trainable, seg.turn) == (prev.trainable, prev.turn):
            merged[-1] = Segment("text", prev.text + seg.text, seg.trainable, seg.turn)
        else:
            merged.append(seg)
    return merged
