"""Checks of a LLaVA conversation before it is tokenized, and the count of samples whose tokens fail after.

The structure rules (alternating human/gpt turns, one ``<image>`` per image, in human turns) are the reference's
except where marked "ours" in ``conversation``'s module docstring; every error names the sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from effilora_lightning.data.conversation_render import IMAGE_TOKEN

__all__ = ["MismatchCounter", "reference_turns", "validate_conversation"]

log = logging.getLogger(__name__)

_HUMAN, _GPT = "human", "gpt"


def reference_turns(conversations: Any) -> tuple[Any, bool]:
    """The turns LLaVA trains on: a conversation whose first turn is from gpt loses that turn.

    Returns the turns and whether one was dropped; anything that is not a list of turns comes back as it is,
    for `validate_conversation` to name.
    """
    first = conversations[0] if isinstance(conversations, list) and conversations else None
    if isinstance(first, dict) and first.get("from") == _GPT:
        return conversations[1:], True
    return conversations, False


def validate_conversation(sample_id: str, conversations: Any, num_images: int) -> None:
    """Raise ValueError (naming the sample) unless turns alternate human/gpt, start with human, end with gpt,
    and the human turns hold exactly one `<image>` per image (gpt turns hold none)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"sample {sample_id!r}: 'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(conversations):
        expected = _HUMAN if i % 2 == 0 else _GPT
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"sample {sample_id!r}: turn {i} must be {{'from': ..., 'value': str}}, got {turn!r}")
        if turn.get("from") != expected:
            raise ValueError(
                f"sample {sample_id!r}: turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                f"(turns must alternate human/gpt, starting with human)"
            )
    if len(conversations) % 2:
        raise ValueError(f"sample {sample_id!r}: the conversation ends on a human turn; it must end with a gpt reply")
    _validate_image_tokens(sample_id, conversations, num_images)


def _validate_image_tokens(sample_id: str, conversations: list[dict[str, str]], num_images: int) -> None:
    """One `<image>` per image, in human turns only."""
    in_gpt = sum(t["value"].count(IMAGE_TOKEN) for t in conversations[1::2])
    if in_gpt:
        raise ValueError(f"sample {sample_id!r}: {IMAGE_TOKEN} appears in a gpt turn; images belong to human turns")
    in_human = sum(t["value"].count(IMAGE_TOKEN) for t in conversations[0::2])
    if in_human > num_images:
        raise ValueError(
            f"sample {sample_id!r}: {in_human} {IMAGE_TOKEN} tokens but {num_images} image(s); "
            f"remove the extra tokens or add the images"
        )
    if in_human < num_images:
        raise ValueError(
            f"sample {sample_id!r}: {num_images} image(s) but {in_human} {IMAGE_TOKEN} tokens; "
            f"put one {IMAGE_TOKEN} in a human turn per image"
        )


@dataclass
class MismatchCounter:
    """Counts samples whose ids do not spell their rendered text; raises past `max_ratio` of those seen."""

    split: str = "train"
    seen: int = 0
    mismatched: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 5

    def add(self, sample_id: str, mismatch: str | None) -> None:
        """Record one checked sample; log the first few mismatches with their reason."""
        self.seen += 1
        if mismatch is None:
            return
        self.mismatched += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((sample_id, mismatch))
            log.warning("%s sample %r: tokenization mismatch, sample dropped: %s", self.split, sample_id, mismatch)

    @property
    def ratio(self) -> float:
        """Share of checked samples that mismatched (0.0 before any)."""
        return self.mismatched / self.seen if self.seen else 0.0

    def raise_if_above(self, max_ratio: float) -> None:
        """RuntimeError when the mismatch share exceeds `max_ratio`, naming examples and what to do."""
        if self.ratio <= max_ratio:
            return
        raise RuntimeError(
            f"{self.split}: {self.mismatched} of {self.seen} samples ({self.ratio:.2%}) do not tokenize to their "
            f"template text, above max_mismatch_ratio={max_ratio}. Examples: {self.examples}. The template and "
            f"the tokenizer do not fit together: use template=llama3 with a LLaMA-3 tokenizer, or raise "
            f"max_mismatch_ratio to drop these samples and go on."
        )
