"""Rendering a LLaVA conversation as template text: ``render`` cuts it into segments (text to tokenize, trained
on or not, special tokens of the template, image placeholders), which the segment-by-segment path tokenizes;
``render_pieces`` gives the same text cut only at its images, with the trained character ranges and special
tokens marked, which is what the whole-piece path (nearly every sample) tokenizes. Both follow one set of
rules (``_render_into``) written to two writers; ``render_pieces`` skips the per-segment objects that cost a
fifth of a 665k-record setup.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal, NamedTuple, Protocol

from effilora_lightning.data.chat_templates import ConversationTemplate

__all__ = ["IMAGE_TOKEN", "Piece", "Segment", "render", "render_pieces"]

IMAGE_TOKEN = "<image>"
"""Where an image goes in a human turn's text (LLaVA's ``DEFAULT_IMAGE_TOKEN``)."""


class Segment(NamedTuple):
    """A piece of the rendered sample: text to tokenize, a special token, or an image placeholder (a tuple:
    setup makes some ten of these per record, hundreds of thousands in all)."""

    kind: Literal["text", "special", "image"]
    text: str
    trainable: bool
    turn: int  # index of the conversation turn it belongs to (-1: bos/system)


class Piece(NamedTuple):
    """The rendered text between two images (the n-th piece follows the n-th image), with the character ranges
    trained on (replies and their end-of-turn tokens; a reply's text is one range) and each special token's
    (start, end, token)."""

    text: str
    trained: list[tuple[int, int]]
    specials: list[tuple[int, int, str]]


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


@functools.lru_cache(maxsize=16)
def _plan(template: ConversationTemplate) -> tuple[tuple[tuple[bool, str], ...], ...]:
    """The system, user and assistant formats as (is_special, text) parts (cached per template)."""
    specials = template.special_tokens
    return tuple(tuple((p in specials, p) for p in _format_pieces(fmt, specials))
                 for fmt in (template.system_format, template.user_format, template.assistant_format))


class _Writer(Protocol):
    """Where ``_render_into`` puts the rendered sample: text, special tokens and image placeholders, in order."""

    def text(self, text: str, trainable: bool, turn: int) -> None: ...

    def special(self, token: str, trainable: bool, turn: int) -> None: ...

    def image(self, turn: int) -> None: ...


def _fill(out: _Writer, parts: tuple[tuple[bool, str], ...], key: str, value: str, trainable: bool,
          turn: int) -> None:
    """One format's parts with ``{key}`` replaced by ``value`` (values never become specials); a user turn's
    text is cut at its images."""
    cut = turn >= 0 and not trainable
    for is_special, part in parts:
        if is_special:
            out.special(part, trainable, turn)
            continue
        text = part.replace(key, value)
        if not cut or IMAGE_TOKEN not in text:
            out.text(text, trainable, turn)
            continue
        for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if j:
                out.image(turn)
            out.text(chunk, trainable, turn)


def _render_into(out: _Writer, conversations: list[dict[str, str]], template: ConversationTemplate,
                 tokenizer: Any) -> None:
    """The rules of the module docstring: system block, then user turns and trainable replies, each reply
    followed by its end-of-turn token (bos not included)."""
    system_parts, user_parts, assistant_parts = _plan(template)
    trim, end = template.trim_messages, None
    if template.system:
        _fill(out, system_parts, "{system}", template.system.strip() if trim else template.system, False, -1)
    for i, turn in enumerate(conversations):
        if i % 2 == 0:
            text = _move_images_to_start(turn["value"])
            _fill(out, user_parts, "{message}", text.strip() if trim else text, False, i)
        else:
            text = turn["value"]
            _fill(out, assistant_parts, "{message}", text.strip() if trim else text, True, i)
            end = end or template.end_token(tokenizer)
            out.special(end, True, i)


class _Segments:
    """Writes segments; neighbouring text of the same turn and trainability becomes one segment, so it
    tokenizes as one natural string."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def text(self, text: str, trainable: bool, turn: int) -> None:
        if not text:
            return
        last = self.segments[-1] if self.segments else None
        if last is not None and last.kind == "text" and (last.trainable, last.turn) == (trainable, turn):
            self.segments[-1] = Segment("text", last.text + text, trainable, turn)
        else:
            self.segments.append(Segment("text", text, trainable, turn))

    def special(self, token: str, trainable: bool, turn: int) -> None:
        self.segments.append(Segment("special", token, trainable, turn))

    def image(self, turn: int) -> None:
        self.segments.append(Segment("image", IMAGE_TOKEN, False, turn))


class _Pieces:
    """Writes pieces (see ``Piece``): the text ``_Segments`` would write, cut at its images, with one trained
    range per trainable text segment or special token."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self._new_piece()

    def _new_piece(self) -> None:
        self.texts: list[str] = []
        self.length, self.trained, self.specials = 0, [], []
        self.last_text: tuple[bool, int] | None = None  # (trainable, turn) when the last thing written was text
        self.pieces.append(Piece("", self.trained, self.specials))

    def text(self, text: str, trainable: bool, turn: int) -> None:
        if not text:
            return
        start = self.length
        self.texts.append(text)
        self.length += len(text)
        if trainable:
            if self.last_text == (True, turn):  # the same segment: its range grows
                self.trained[-1] = (self.trained[-1][0], self.length)
            else:
                self.trained.append((start, self.length))
        self.last_text = (trainable, turn)

    def special(self, token: str, trainable: bool, turn: int) -> None:
        start = self.length
        self.texts.append(token)
        self.length += len(token)
        if trainable:
            self.trained.append((start, self.length))
        self.specials.append((start, self.length, token))
        self.last_text = None

    def image(self, turn: int) -> None:
        self.close()
        self._new_piece()

    def close(self) -> None:
        self.pieces[-1] = self.pieces[-1]._replace(text="".join(self.texts))


def render(conversations: list[dict[str, str]], template: ConversationTemplate, tokenizer: Any) -> list[Segment]:
    """Segments of the whole conversation (bos not included); what the segment-by-segment path tokenizes."""
    out = _Segments()
    _render_into(out, conversations, template, tokenizer)
    return out.segments


def render_pieces(conversations: list[dict[str, str]], template: ConversationTemplate, tokenizer: Any
                  ) -> list[Piece]:
    """The same rendering cut at its images (see ``Piece``), without building segments: what the whole-piece
    path tokenizes (tests/data/test_conversation.py checks it against ``render``)."""
    out = _Pieces()
    _render_into(out, conversations, template, tokenizer)
    out.close()
    return out.pieces
