"""LLaVA `conversations` -> `input_ids`, `labels` (the templates, checks and rendering it uses live in
`chat_templates`, `conversation_checks` and `conversation_render`; their names are importable from here too).

A sample is rendered as text with its trainable character ranges marked, cut at each image, and each piece
is tokenized WHOLE, as the LLaVA reference does (``tokenizer_image_token`` tokenizes the text between images,
each piece on its own). The ids are therefore the reference's for any tokenizer, SentencePiece (prefix
spaces, ``legacy`` either way) or BPE. The labels come from the tokenizer's character offsets: a token is
trained when it covers a character of a reply or of its end-of-turn token (the reference masks by lengths
measured separately and, when they disagree, masks the whole sample and trains on nothing)::

    [bos] [system + user turn 1 .. "<image>" ..] [reply 1 + end-of-turn] [user turn 2] [reply 2 + end-of-turn]
     -100   -100 ............ -100 (IMAGE -200 in ids)  = ids                 -100        = ids

vicuna_v1 (LLaVA-1.5's ``conv_vicuna_v1``), with the tokenizer's eos as the end of turn (LLaVA's "</s>")::

    <bos>{system} USER: <image>\\n{q1} ASSISTANT: {a1}<eos>USER: {q2} ASSISTANT: {a2}<eos>

llama3 (LLaMA-3 chat; the LLaVA reference has none)::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{q1}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n
    {a1}<|eot_id|>...

Rules (the reference's, except where marked "ours"):
- A conversation whose first turn is from gpt loses that turn (LLaVA's preprocess skips it, see
  `reference_turns`; the DataModule counts them as ``leading_gpt_dropped``). Ours: a conversation that ends on
  a human turn is refused (the reference would train on a prompt with no reply).
- Each `<image>` of a human turn is moved to the start of that turn ("<image>\\n" * k + text, then stripped,
  so a turn that is only `<image>` renders as `<image>`) and becomes one `IMAGE_TOKEN_INDEX` position; the
  model expands it to the tower's patch features. Labels there are -100.
- llama3 trims every message (the official chat format's ``content | trim``); vicuna_v1 keeps them as given.
- The bos comes from the tokenizer and is added exactly once, as an id before the text (the text is tokenized
  with `add_special_tokens=False`).
- Template special tokens (headers, end of turn) are looked up as single ids and refused if the tokenizer
  lacks them (a LLaMA-3 template needs a LLaMA-3 tokenizer).
- Ours: a message that contains special-token text ("<|eot_id|>", "</s>") never becomes a special token. Such
  a sample (rare) is tokenized segment by segment with `split_special_tokens=True` instead, and its ids must
  then decode back to the rendered text (`EncodedConversation.mismatch`); `MismatchCounter` counts the samples
  that do not and raises past a configured share. So does a tokenizer without character offsets (no fast
  tokenizer), for every sample.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from effilora_lightning.data.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from effilora_lightning.data.chat_templates import (
    LLAMA3,
    TEMPLATES,
    VICUNA_V1,
    ConversationTemplate,
    check_template,
    get_template,
    special_id,
)
from effilora_lightning.data.conversation_checks import MismatchCounter, reference_turns, validate_conversation
from effilora_lightning.data.conversation_render import IMAGE_TOKEN, Piece, Segment, render, render_pieces
from effilora_lightning.data.fast_bpe import Offsets, PairOffsets
from effilora_lightning.data.tokenizer import encode_texts

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "LLAMA3",
    "TEMPLATES",
    "VICUNA_V1",
    "ConversationTemplate",
    "EncodedConversation",
    "MismatchCounter",
    "RenderedConversations",
    "check_template",
    "encode_conversation",
    "encode_conversations",
    "encode_prompt",
    "encode_prompts",
    "encoded_conversations",
    "get_template",
    "reference_turns",
    "render_conversations",
    "render_prompts",
    "validate_conversation",
]


@dataclass
class EncodedConversation:
    """Token ids of one sample; `labels` are -100 except on assistant replies and their end-of-turn token."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    mismatch: str | None = None
    """Why the ids cannot be trusted to spell the rendered text (None: they can, or the check was skipped)."""


def _trained_labels(ids: list[int], offsets: Offsets | PairOffsets, trained: list[tuple[int, int]]) -> tuple[list[int], bool]:
    """-100 except on tokens that cover a trained character; also whether every trained range got a token.
    Offsets are non-decreasing, so each range is two bisections, not a loop over tokens: range [first, stop)
    trains the tokens that end after ``first`` and start before ``stop``."""
    labels = [IGNORE_INDEX] * len(ids)
    covered = True
    for first, stop in trained:
        i, j = offsets.ending_after(first), offsets.starting_from(stop)
        labels[i:j] = ids[i:j]
        covered &= j > i
    return labels, covered


def _only_template_specials(ids: list[int], offsets: Offsets | PairOffsets, expected: list[tuple[int, tuple[int, int]]],
                            added: set[int]) -> bool:
    """Whether the piece's tokens with an id of ``added`` (what the tokenizer matches in raw text) are exactly
    ``expected``, the (id, (start, end)) of each template special in text order: no message text turned into a
    special token. The answer of ``[(i, o) for i, o in zip(ids, offsets) if i in added] == expected``, without
    that Python loop over every token: the added ids are counted in C, then each expected one is found by
    bisection of the sorted starts (``holds``); the loop runs only where the bisection cannot decide."""
    if sum(map(added.__contains__, ids)) != len(expected) or not added.issuperset(map(_ID, expected)):
        return False
    return offsets.holds(ids, expected) or \
        [(i, tuple(o)) for i, o in zip(ids, offsets) if i in added] == expected


_ID = operator.itemgetter(0)


def _encode_whole(samples: Sequence[list[Piece]], encoded: Sequence[tuple[list[int], Sequence[tuple[int, int]]]],
                  tokenizer: Any, template: ConversationTemplate
                  ) -> list[tuple[list[int], list[int], str | None] | None]:
    """Ids, labels and mismatch of each sample from its pieces' ``encoded`` (ids, offsets), every piece tokenized
    whole in ONE batched tokenizer call (per-call overhead dominates otherwise, and setup tokenizes every record).
    None for a sample where a message's text became a special token: it goes segment by segment instead."""
    rows = iter(encoded)
    added = set(tokenizer.added_tokens_decoder)  # ids the tokenizer matches in raw text
    special_ids: dict[str, int] = {}
    out: list[tuple[list[int], list[int], str | None] | None] = []
    for pieces in samples:
        input_ids, labels, clean, covered = [], [], True, True
        for n, piece in enumerate(pieces):
            ids, pairs = next(rows)
            offsets = Offsets.of(pairs)  # (tiktoken's are Offsets already; the tokenizer's searched in place)
            if clean:
                expected = [(special_ids.get(token) or special_ids.setdefault(
                    token, special_id(tokenizer, token, template)), (s, e)) for s, e, token in piece.specials]
                clean = _only_template_specials(ids, offsets, expected, added)
            piece_labels, piece_covered = _trained_labels(ids, offsets, piece.trained)
            covered &= piece_covered
            input_ids += ([IMAGE_TOKEN_INDEX] if n else []) + list(ids)
            labels += ([IGNORE_INDEX] if n else []) + piece_labels
        mismatch = None if covered else "a reply got no token (the tokenizer's character offsets do not cover it)"
        out.append((input_ids, labels, mismatch) if clean else None)
    return out


def _tokenize_segments(rendered: Sequence[Sequence[Segment]], tokenizer: Any, template: ConversationTemplate
                       ) -> list[list[list[int]]]:
    """Ids of every segment of every sample, text with `split_special_tokens=True` (one batched call)."""
    texts = [seg.text for segments in rendered for seg in segments if seg.kind == "text"]
    encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else [])
    specials = {seg.text for segments in rendered for seg in segments if seg.kind == "special"}
    special_ids = {token: special_id(tokenizer, token, template) for token in specials}
    pieces = []
    for segments in rendered:
        pieces.append([
            list(next(encoded)) if seg.kind == "text"
            else [special_ids[seg.text]] if seg.kind == "special" else [IMAGE_TOKEN_INDEX]
            for seg in segments
        ])
    return pieces


def _runs(segments: Sequence[Segment], pieces: Sequence[list[int]]) -> tuple[list[str], list[list[int]]]:
    """Rendered text and ids of the stretches between image placeholders."""
    runs_text, runs_ids = [""], [[]]
    for seg, ids in zip(segments, pieces, strict=True):
        if seg.kind == "image":
            runs_text.append("")
            runs_ids.append([])
        else:
            runs_text[-1] += seg.text
            runs_ids[-1] += ids
    return runs_text, runs_ids


def _first_difference(got: str, want: str) -> str:
    """Where decoded ids and rendered text part, with some context."""
    at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    start = max(0, at - 20)
    got, want = got[start: at + 40], want[start: at + 40]
    return f"at character {at} the ids decode to {got!r}, the template renders {want!r}"


def _check_round_trips(rendered: Sequence[Sequence[Segment]], pieces: Sequence[Sequence[list[int]]],
                       tokenizer: Any) -> list[str | None]:
    """Per sample: None when the ids between image placeholders decode to exactly the rendered text."""
    texts, ids, owner = [], [], []
    for n, (segments, sample_pieces) in enumerate(zip(rendered, pieces, strict=True)):
        run_texts, run_ids = _runs(segments, sample_pieces)
        texts += run_texts
        ids += run_ids
        owner += [n] * len(run_texts)
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    reasons: list[str | None] = [None] * len(rendered)
    for n, got, want in zip(owner, decoded, texts, strict=True):
        if got != want and reasons[n] is None:
            reasons[n] = _first_difference(got, want)
    return reasons


def _encode_segmentwise(rendered: Sequence[Sequence[Segment]], tokenizer: Any, template: ConversationTemplate,
                        check: bool) -> list[tuple[list[int], list[int], str | None]]:
    """Ids, labels and mismatch of each sample with every segment tokenized apart (see the module docstring)."""
    pieces = _tokenize_segments(rendered, tokenizer, template)
    reasons = _check_round_trips(rendered, pieces, tokenizer) if check else [None] * len(rendered)
    out = []
    for segments, sample_pieces, reason in zip(rendered, pieces, reasons, strict=True):
        input_ids, labels = [], []
        for seg, ids in zip(segments, sample_pieces, strict=True):
            input_ids += ids
            labels += ids if seg.trainable else [IGNORE_INDEX] * len(ids)
        out.append((input_ids, labels, reason))
    return out


@dataclass
class RenderedConversations:
    """Checked turns of some samples, rendered to whole pieces where the tokenizer is a fast one: what is left
    is to tokenize ``texts`` (``encode_texts(..., offsets=True)``, possibly in another thread, see
    ``EncodeAhead``) and call ``encoded``."""

    turns: Sequence[list[dict[str, str]]]
    pieces: list[list[Piece]] | None  # None: no character offsets; every sample goes segment by segment

    @property
    def texts(self) -> list[str]:
        return [piece.text for pieces in self.pieces or () for piece in pieces]


def render_conversations(turns: Sequence[list[dict[str, str]]], template: ConversationTemplate, tokenizer: Any
                         ) -> RenderedConversations:
    """The first half of ``encode_conversations``' work for checked turns: render them to whole pieces."""
    pieces = [render_pieces(conv, template, tokenizer) for conv in turns] if getattr(tokenizer, "is_fast", False) \
        else None
    return RenderedConversations(turns, pieces)


def render_prompts(turns: Sequence[list[dict[str, str]]], template: ConversationTemplate, tokenizer: Any
                   ) -> RenderedConversations:
    """``render_conversations`` of each conversation's generation prompt: the turns without the last reply (the
    reference answer), up to and including the assistant header."""
    return render_conversations([conv[:-1] for conv in turns], template, tokenizer)


def encoded_conversations(rendered: RenderedConversations, encoded: Sequence[Any], tokenizer: Any,
                          template: ConversationTemplate, num_images: Sequence[int], check: bool = True
                          ) -> list[EncodedConversation]:
    """The second half: each sample's ``EncodedConversation`` from ``encoded``, the (ids, offsets) of
    ``rendered.texts``."""
    return [EncodedConversation(ids, labels, n, mismatch) for (ids, labels, mismatch), n in
            zip(_encode_turns(rendered, encoded, tokenizer, template, check), num_images, strict=True)]


def _encode_turns(rendered: RenderedConversations, encoded: Sequence[Any], tokenizer: Any,
                  template: ConversationTemplate, check: bool) -> list[tuple[list[int], list[int], str | None]]:
    """bos + ids, labels and mismatch of each sample's (checked) turns: whole pieces where the tokenizer gives
    character offsets and no message text turns into a special token, segment by segment otherwise."""
    turns = rendered.turns
    if not turns:
        return []
    whole = _encode_whole(rendered.pieces, encoded, tokenizer, template) if rendered.pieces is not None \
        else [None] * len(turns)
    rest = [n for n, e in enumerate(whole) if e is None]
    if rest:
        segmented = [render(turns[n], template, tokenizer) for n in rest]
        for n, e in zip(rest, _encode_segmentwise(segmented, tokenizer, template, check), strict=True):
            whole[n] = e
    if tokenizer.bos_token is None:
        return whole
    bos = special_id(tokenizer, tokenizer.bos_token, template)
    return [([bos, *ids], [IGNORE_INDEX, *labels], mismatch) for ids, labels, mismatch in whole]


def _encode_checked(turns: Sequence[list[dict[str, str]]], tokenizer: Any, template: ConversationTemplate,
                    check: bool) -> list[tuple[list[int], list[int], str | None]]:
    """``_encode_turns`` of turns rendered and tokenized here, in this thread."""
    rendered = render_conversations(turns, template, tokenizer)
    encoded = encode_texts(tokenizer, rendered.texts, offsets=True) if rendered.pieces else []
    return _encode_turns(rendered, encoded, tokenizer, template, check)


def _conversation_turns(conversations: Sequence[Any], num_images: Sequence[int], sample_ids: Sequence[str],
                        checked: bool = False) -> list[list[dict[str, str]]]:
    """The reference's turns of each sample (a leading gpt turn dropped), validated; as given when ``checked``
    (setup has done both to each record already)."""
    if checked:
        return list(conversations)
    turns = []
    for conv, n, sid in zip(conversations, num_images, sample_ids, strict=True):
        conv, _ = reference_turns(conv)
        validate_conversation(sid, conv, n)
        turns.append(conv)
    return turns


def encode_conversations(
    conversations: Sequence[list[dict[str, str]]],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    num_images: Sequence[int] | None = None,
    sample_ids: Sequence[str] | None = None,
    check: bool = True,
    checked: bool = False,
) -> list[EncodedConversation]:
    """`encode_conversation` for many samples with one tokenizer call (what setup uses). ``checked=True``: the
    conversations already went through ``reference_turns`` and ``validate_conversation`` (setup's record checks).

    Raises:
        ValueError: the first invalid conversation (naming its id) or a template the tokenizer cannot express.
    """
    num_images = list(num_images) if num_images is not None else [0] * len(conversations)
    sample_ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(conversations))]
    turns = _conversation_turns(conversations, num_images, sample_ids, checked)
    return [EncodedConversation(ids, labels, n, mismatch)
            for (ids, labels, mismatch), n in zip(_encode_checked(turns, tokenizer, template, check), num_images,
                                                  strict=True)]


def encode_conversation(
    conversations: list[dict[str, str]],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    num_images: int = 0,
    sample_id: str = "?",
    check: bool = True,
) -> EncodedConversation:
    """Validate, render and tokenize a LLaVA `conversations` list (see the module docstring).

    Raises:
        ValueError: an invalid conversation (naming `sample_id`) or a template the tokenizer cannot express.
    """
    return encode_conversations([conversations], template, tokenizer, num_images=[num_images],
                                sample_ids=[sample_id], check=check)[0]


def encode_prompts(
    conversations: Sequence[list[dict[str, str]]],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    num_images: Sequence[int],
    sample_ids: Sequence[str],
    checked: bool = False,
) -> list[tuple[list[int], str]]:
    """`encode_prompt` for many samples with one tokenizer call (``checked``: as for `encode_conversations`).
    A prompt is the conversation without its last reply, rendered: the same segments as the whole
    conversation's before that reply."""
    turns = _conversation_turns(conversations, num_images, sample_ids, checked)
    rendered = render_prompts(turns, template, tokenizer)
    encoded = encode_texts(tokenizer, rendered.texts, offsets=True) if rendered.pieces else []
    return [(e.input_ids, conv[-1]["value"]) for e, conv in zip(
        encoded_conversations(rendered, encoded, tokenizer, template, num_images, check=False), turns, strict=True)]


def encode_prompt(
    conversations: list[dict[str, str]],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    num_images: int = 0,
    sample_id: str = "?",
) -> tuple[list[int], str]:
    """Generation prompt (every segment before the last reply, ending with the assistant header) and the
    last reply as the reference answer. The prompt is tokenized on its own, as the reference's evaluation
    does; its ids are the prefix of `encode_conversation`'s ids for the tokenizers we know."""
    return encode_prompts([conversations], template, tokenizer, num_images=[num_images], sample_ids=[sample_id])[0]
