"""Setup of one visual instruction split: its records checked and tokenized, batch by batch, into a token-cache
entry (``token_cache``), which every later run and every other rank of the node memory-maps.

What is checked, and what is an error or a counted skip, is in ``visual_instruction``'s module docstring. A
sample keeps its record's index in the file as its integer ``sample_id`` and the record's "id" as its name.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from effilora_lightning.data.batch import IGNORE_INDEX
from effilora_lightning.data.chat_templates import ConversationTemplate
from effilora_lightning.data.conversation import (
    RenderedConversations,
    encoded_conversations,
    render_conversations,
    render_prompts,
)
from effilora_lightning.data.conversation_checks import MismatchCounter, reference_turns, validate_conversation
from effilora_lightning.data.fast_bpe import fast_bpe
from effilora_lightning.data.images import BadRecordError, check_images, image_paths, raise_for
from effilora_lightning.data.node_build import Shard
from effilora_lightning.data.records import RecordError, RecordStream, records_at
from effilora_lightning.data.split import seeded_split
from effilora_lightning.data.token_cache import EntryBuilder, TokenRowsWriter
from effilora_lightning.data.tokenizer import EncodeAhead

__all__ = ["SplitBuilder"]

_CHUNK = 1024  # records tokenized per tokenizer call in setup
_WHOLE = Shard()  # a build that is not split
PROGRESS_EVERY_S = 10.0  # a build prints a progress line this often


@dataclass(frozen=True)
class _FileCount:
    """What the count's pass over a file found: for each record that parses, in file order, its index in the
    file and where its text starts (``RecordStream.start``); the seeded validation split's record indices; the
    JSON lines skipped. 16 bytes a record: 11 MB for llava_v1_5_mix665k."""

    indices: np.ndarray  # (records,) int64
    starts: np.ndarray  # (records,) int64
    held: set[int]
    skipped: int

    def located(self, part: str, shard: Shard) -> tuple[int, Iterator[tuple[int, int]]]:
        """How many records ``shard``'s contiguous slice of part ``part`` holds, and their (index, start) pairs in
        file order (made as they are read: no list of 300k tuples)."""
        ordinals = np.arange(len(self.indices))
        if part != "all":
            is_held = np.isin(self.indices, np.fromiter(self.held, np.int64, len(self.held)))
            ordinals = np.flatnonzero(is_held if part == "held_out" else ~is_held)
        mine = shard.of(ordinals)
        return len(mine), zip(self.indices[mine].tolist(), self.starts[mine].tolist())


class SplitBuilder:
    """Checks and tokenizes the records of a split for a DataModule's settings (``hparams``), template and
    tokenizer; ``build`` is what the token cache calls when it has no entry for them. One builder serves one
    ``setup``: it counts each file once (the train and held-out parts of a split file both need the count)."""

    def __init__(self, hparams: Any, template: ConversationTemplate, tokenizer: Any) -> None:
        self.hparams, self.template, self.tokenizer = hparams, template, tokenizer
        self._counts: dict[str, _FileCount] = {}

    def records_in(self, path: str, part: str) -> int:
        """How many records part ``part`` ("all", "train", "held_out") of ``path`` has (the count's pass). Called
        before a build forks its pieces (``node_build.build_pieces``): the count and the tokenizer's tiktoken
        path (~4 s to make for LLaMA-3's) made here are every piece's without being made again."""
        fast_bpe(self.tokenizer)
        count = self._count(path)
        held = len(count.held)
        return held if part == "held_out" else len(count.indices) - held if part == "train" else len(count.indices)

    def _count(self, path: str) -> _FileCount:
        """The count's pass over ``path`` (``_FileCount``), the first time this builder is asked.

        The split is drawn over the positions of the records that parse (as the commonsense module draws it
        over its list) and mapped back to their indices in the file, which count the skipped lines too: a
        skipped line is in neither part, and the held-out part has ``val_set_size`` records however many
        lines were skipped."""
        if path not in self._counts:
            stream = RecordStream(path, self.hparams.on_bad_record)
            indices, starts = array("q"), array("q")
            for index, _ in stream:
                indices.append(index)
                starts.append(stream.start)
            positions = seeded_split(len(indices), self.hparams.val_set_size, self.hparams.seed).held_out
            self._counts[path] = _FileCount(np.frombuffer(indices, np.int64), np.frombuffer(starts, np.int64),
                                            {indices[p] for p in positions}, stream.skipped)
        return self._counts[path]

    def build(self, split: str, path: str, part: str, generation: bool, entry: EntryBuilder,
              shard: Shard = _WHOLE) -> dict[str, Any]:
        """Check and tokenize ``shard``'s contiguous slice of the split's records batch by batch into ``entry``;
        returns its meta (errors or counts, see the module docstring), which ``merge`` joins with the other
        parts'.

        A whole file is parsed as it is read. A part of a split file, or a slice of one, needs the count's pass
        first, which says where each record starts: the build then parses only its own records
        (``records.records_at``), so a rank's slice, a build piece or the held-out records scattered over the
        file cost what they hold, not a parse of every record before them."""
        if part == "all" and shard.count == 1:
            stream, total = RecordStream(path, self.hparams.on_bad_record), None
        else:
            count = self._count(path)
            total, located = count.located(part, shard)
            stream = records_at(path, located)
        built = _SplitBuild(split, Counter(total=0), MismatchCounter(split=split), entry.rows("tokens"),
                            entry.rows("prompts") if generation else None)
        progress = _Progress(split, path, _progress_of(total, shard))
        prepared = (self._prepare_batch(batch, path, built) for batch in _batches(stream, total))
        for ready, encoded in EncodeAhead(self.tokenizer, offsets=True).map(prepared, _Prepared.texts):
            self._finish_batch(ready, encoded, built)
            progress.update(ready.read, ready.fraction)
        return self._finish(built, stream.skipped if total is None else count.skipped)

    def merge(self, split: str, path: str, generation: bool, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The split's meta from its parts' (in order), after the checks that need the whole split: counts
        summed (JSON lines skipped: each part counted the whole file), lists joined."""
        stats: Counter[str] = Counter()
        for part in parts:
            stats.update(part["stats"])
        examples = [e for p in parts for e in p["mismatch"]["examples"]][: MismatchCounter.max_examples]
        mismatch = MismatchCounter(split, sum(p["mismatch"]["seen"] for p in parts),
                                   sum(p["mismatch"]["mismatched"] for p in parts), examples)
        mismatch.raise_if_above(self.hparams.max_mismatch_ratio)
        meta = {key: [x for p in parts for x in p[key]] for key in ("sample_ids", "names", "images", "answers")}
        if not meta["sample_ids"] and split == "train":
            raise RecordError(f"{path}: no training sample is left after the checks ({dict(stats)}, "
                              f"{mismatch.mismatched} tokenization mismatches). Fix the records, raise "
                              "max_length, or check image_folder.")
        if generation:
            _require_unique_ids(meta["names"], path)
        stats = Counter(dict(sorted(stats.items())))  # the order a part first met each key depends on its batches
        stats["kept"], stats["mismatch"] = len(meta["sample_ids"]), mismatch.mismatched
        return {**meta, "stats": dict(stats), "json_skipped": parts[0]["json_skipped"],
                "mismatch": {"seen": mismatch.seen, "mismatched": mismatch.mismatched,
                             "examples": [list(e) for e in mismatch.examples]}}

    def _prepare_batch(self, batch: tuple[list[tuple[int, Any]], float], path: str, built: _SplitBuild
                       ) -> _Prepared:
        """The Python half of a batch before tokenization: images checked (in parallel threads), conversations
        checked and rendered. ``batch``: the (index, record) pairs and how far into the file they reach."""
        records, fraction = batch
        hp = self.hparams
        built.stats["total"] += len(records)
        paths: dict[int, tuple[str, ...]] = {}
        for index, record in records:
            try:
                paths[index] = image_paths(record, "", hp.image_folder, hp.allow_images_outside_folder)
            except (ValueError, AttributeError):
                continue  # named by _check_record below
        check_images([p for ps in paths.values() for p in ps], hp.image_check == "decode", built.images_checked)
        checked = [(i, *c) for i, r in records if (c := self._check_record(r, i, path, built, paths)) is not None]
        turns = [c[3] for c in checked]
        rendered = render_conversations(turns, self.template, self.tokenizer)
        prompts = render_prompts(turns, self.template, self.tokenizer) if built.prompts is not None else None
        return _Prepared(checked, rendered, prompts, fraction, built.stats["total"])

    def _finish_batch(self, ready: _Prepared, encoded: list[Any], built: _SplitBuild) -> None:
        """The Python half after tokenization (``encoded``: the (ids, offsets) of ``ready``'s texts): labels,
        mismatches, length checks, the generation prompts, and the rows written."""
        hp, checked = self.hparams, ready.checked
        num_images, whole = [len(c[2]) for c in checked], len(ready.rendered.texts)
        conversations = encoded_conversations(ready.rendered, encoded[:whole], self.tokenizer, self.template,
                                              num_images)
        prompts = [p.input_ids for p in encoded_conversations(ready.prompts, encoded[whole:], self.tokenizer,
                                                              self.template, num_images, check=False)] \
            if ready.prompts is not None else [None] * len(checked)
        for (index, name, images, turns), enc, prompt in zip(checked, conversations, prompts, strict=True):
            built.mismatch.add(name, enc.mismatch)
            if enc.mismatch is not None:
                continue
            length = _fitted_length(enc.input_ids, enc.labels, hp.max_length, whole=built.prompts is not None)
            if length is None:
                built.stats["too_long"] += 1
                continue
            built.tokens.add(enc.input_ids[:length], list(map(IGNORE_INDEX.__ne__, enc.labels[:length])))
            if built.prompts is not None:
                built.prompts.add_masked(prompt, len(prompt))
                built.answers.append(turns[-1]["value"])  # the reference answer: the last reply
            built.sample_ids.append(index)
            built.names.append(name)
            built.images.append(list(images))

    @staticmethod
    def _finish(built: _SplitBuild, json_skipped: int) -> dict[str, Any]:
        """The meta of one part (the checks that need the whole split are ``merge``'s)."""
        return {"sample_ids": built.sample_ids, "names": built.names, "images": built.images, "answers": built.answers,
                "stats": dict(built.stats), "json_skipped": json_skipped,
                "mismatch": {"seen": built.mismatch.seen, "mismatched": built.mismatch.mismatched,
                             "examples": built.mismatch.examples}}

    def _check_record(self, record: Any, index: int, path: str, built: _SplitBuild,
                      paths: dict[int, tuple[str, ...]]) -> tuple[str, tuple[str, ...], list[dict[str, str]]] | None:
        """Conversation structure and image files of one record: (sample id, images, turns), None when
        skipped (counted), or an error naming the sample id (and the image path). ``paths``: the record's
        image paths where ``image_paths`` gave them (it raises again here, naming the sample, where not)."""
        hp = self.hparams
        sample_id = str(record["id"]) if isinstance(record, dict) and "id" in record else f"{Path(path).name}#{index}"
        try:
            if not isinstance(record, dict):
                raise BadRecordError("bad_record", f"sample {sample_id!r}: record {index} is a "
                                     f"{type(record).__name__}, expected an object with 'conversations'")
            images = paths[index] if index in paths else \
                image_paths(record, sample_id, hp.image_folder, hp.allow_images_outside_folder)
            conversations, dropped = reference_turns(record.get("conversations"))
            validate_conversation(sample_id, conversations, len(images))
            for image in images:
                if (error := built.images_checked.get(image)) is not None:
                    raise_for(sample_id, error)
        except ValueError as err:
            if hp.on_bad_record == "error":
                raise err if isinstance(err, BadRecordError) else ValueError(f"{path}: {err}") from err
            built.stats[getattr(err, "kind", "bad_conversation")] += 1
            return None
        built.stats["leading_gpt_dropped"] += dropped  # LLaVA's preprocess drops that turn and trains on the rest
        return sample_id, images, conversations


def _batches(stream: Iterator[tuple[int, Any]], total: int | None) -> Iterator[tuple[list[tuple[int, Any]], float]]:
    """The (index, record) pairs of ``stream``, ``_CHUNK`` at a time, each batch with the fraction read so far: of
    the ``total`` records, or of the file (a ``RecordStream``) when there is no total."""
    batch, seen = [], 0
    for pair in stream:
        batch.append(pair)
        if len(batch) == _CHUNK:
            seen += len(batch)
            yield batch, stream.fraction if total is None else seen / max(total, 1)
            batch = []
    if batch:
        yield batch, 1.0


@dataclass
class _Prepared:
    """A batch between its two halves: the checked records (index, sample id, images, turns), rendered."""

    checked: list[tuple[int, str, tuple[str, ...], list[dict[str, str]]]]
    rendered: RenderedConversations
    prompts: RenderedConversations | None  # generation splits: each conversation without its last reply
    fraction: float  # of the records to read, read up to the end of this batch
    read: int  # records read up to the end of this batch (the encoder works one batch ahead of the rows)

    def texts(self) -> list[str]:
        """Everything the batch tokenizes, in one call: the conversations' pieces, then the prompts'."""
        return self.rendered.texts + (self.prompts.texts if self.prompts is not None else [])


def _fitted_length(input_ids: list[int], labels: list[int], max_length: int, whole: bool) -> int | None:
    """Length after right truncation, or None when it would cut an image or every supervised token (or
    anything at all when `whole`)."""
    if len(input_ids) <= max_length:
        return len(input_ids)
    cut_ids, cut_labels = input_ids[max_length:], labels[:max_length]
    if whole or any(i < 0 for i in cut_ids) or all(lab == IGNORE_INDEX for lab in cut_labels):
        return None
    return max_length


def _require_unique_ids(names: list[str], path: str) -> None:
    """Evaluation samples are reported by their record id, so those ids must be unique (the integer sample ids
    the evaluation counts by are record indices, unique by construction)."""
    counts = Counter(names)
    duplicates = [sid for sid, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"{path}: evaluation sample ids must be unique; repeated: {duplicates[:5]}")


@dataclass
class _SplitBuild:
    """What a split's build accumulates, batch by batch."""

    split: str
    stats: Counter[str]
    mismatch: MismatchCounter
    tokens: TokenRowsWriter
    prompts: TokenRowsWriter | None
    sample_ids: list[int] = field(default_factory=list)  # record index in the file
    names: list[str] = field(default_factory=list)  # the record's "id"
    images: list[list[str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    images_checked: dict[str, BadRecordError | None] = field(default_factory=dict)


def _progress_of(total: int | None, shard: Shard) -> str:
    """What a build's progress fraction is of: the file it streams, or the records of its part or slice."""
    if total is None:
        return "the file"
    if shard.count > 1:
        return f"slice {shard.index + 1}/{shard.count}'s {total} records"
    return f"its {total} records"


class _Progress:
    """Setup of a large split prints a line every ``every`` seconds: records so far, records/s and an ETA."""

    def __init__(self, split: str, path: str, of: str) -> None:
        self.split, self.path, self.of, self.every = split, path, of, PROGRESS_EVERY_S  # of: what the fraction is of
        self.start = self.last = time.monotonic()

    def update(self, records: int, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        rank_zero_info(f"visual instruction {self.split} ({self.path}): {records} records checked and tokenized, "
                       f"{records / elapsed:.0f} records/s, {fraction:.0%} of {self.of}, about {eta:.0f} s to go")
