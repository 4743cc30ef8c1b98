"""Commonsense records -> examples -> batches: validating a record, building the training sequence and the
generation prompt of one record, the two datasets over cached token rows, and the two collate functions.

Sequences are ``<bos> prompt output <eos>`` (see ``commonsense``' module docstring for why BOS is added here and
when EOS is kept); batches follow the contract of ``batch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from effilora_lightning.data.batch import IGNORE_INDEX, pack, pad, pad_mask
from effilora_lightning.data.commonsense_prompts import ANSWER_PATTERNS, build_train_prompt
from effilora_lightning.data.fast_bpe import pretokenizes_as_llama3
from effilora_lightning.data.records import RecordError, RecordStream
from effilora_lightning.data.token_cache import TokenRows
from effilora_lightning.data.tokenizer import encode_texts

__all__ = ["Encoding", "LossRows", "PromptRows", "PromptTokens", "collate_generate", "collate_train", "drop_bos", "eval_prompt",
           "UsableRecords", "load_records", "record_problem", "token_ids", "train_example"]


def record_problem(record: Any, required: tuple[str, ...], task: str | None = None) -> str | None:
    """Describe what is wrong with one record (None when it is usable).

    Every field in ``required`` must be a non-empty string; ``input`` must be absent or empty (only the
    no-input Alpaca branch exists); a test record's ``answer`` must be one of the task's labels.
    """
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, expected a JSON object"
    for field in required:
        if field not in record:
            return f"field '{field}' is missing"
        if not isinstance(record[field], str) or not record[field].strip():
            return f"field '{field}' must be a non-empty string, got {record[field]!r}"
    if record.get("input", ""):
        return "field 'input' is not empty; only the no-input Alpaca prompt is supported"
    if task is not None and not ANSWER_PATTERNS[task].fullmatch(record["answer"]):
        return f"field 'answer' is {record['answer']!r}, not a label of task {task} ({ANSWER_PATTERNS[task].pattern})"
    return None


class UsableRecords:
    """The usable (index, record) pairs of a file, parsed as they are read (``records.RecordStream``): memory
    holds one chunk of text, not the file's records (170k commonsense records are ~400 MB as Python objects).
    Iterate once per pass; after a whole pass, ``read`` counts the records parsed and ``skipped`` those dropped
    (JSON Lines lines that do not parse and invalid records)."""

    def __init__(self, path: Path, required: tuple[str, ...], on_bad_record: str, task: str | None = None) -> None:
        self.path, self.required, self.on_bad_record, self.task = path, required, on_bad_record, task
        self.read = self.skipped = 0

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        stream = RecordStream(self.path, self.on_bad_record)
        invalid = read = 0
        for index, record in stream:
            read += 1
            problem = record_problem(record, self.required, self.task)
            if problem is None:
                yield index, record
            elif self.on_bad_record == "error":
                raise RecordError(f"{self.path}: record {index}: {problem}. Fix the record or pass "
                                  "on_bad_record='skip'.")
            else:
                invalid += 1
        self.read, self.skipped = read, stream.skipped + invalid

    def count(self) -> int:
        """Usable records (one pass); raises when there are none."""
        usable = sum(1 for _ in self)
        if not usable:
            self.raise_empty()
        return usable

    def raise_empty(self) -> None:
        raise RecordError(f"{self.path}: no usable records ({self.read} read, {self.skipped} skipped)")


def load_records(
    path: Path, required: tuple[str, ...], on_bad_record: str, task: str | None = None
) -> tuple[list[tuple[int, dict[str, str]]], int]:
    """Read and validate a file; return the usable (index, record) pairs and how many were skipped."""
    usable = UsableRecords(path, required, on_bad_record, task)
    records = list(usable)
    if not records:
        usable.raise_empty()
    return records, usable.skipped


@dataclass(frozen=True)
class Encoding:
    """Token ids shared by every example: BOS/EOS/pad and the length limits."""

    bos: int | None
    eos: int | None
    pad: int
    cutoff_len: int
    max_eval_prompt_len: int | None = None


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], bos: int | None) -> list[list[int]]:
    """Tokenize without special tokens (so BOS is never doubled), dropping a BOS the text itself spelled out.
    Each distinct text is tokenized once (the outputs are a handful of "the correct answer is ..." strings)."""
    unique = list(dict.fromkeys(texts))
    ids_of = dict(zip(unique, encode_texts(tokenizer, unique)))
    return drop_bos([ids_of[t] for t in texts], bos)


def drop_bos(token_rows: list[list[int]], bos: int | None) -> list[list[int]]:
    """Each row without the BOS its text spelled out, if it did (BOS is added once, as an id, by the caller)."""
    return [ids[1:] if bos is not None and ids[:1] == [bos] else ids for ids in token_rows]


_PROBES = ("Please choose: a/b", "x", "Hello, world 2024", "ends in 12345", "tab\tinside and\n\nnew lines ok",
           "'s own", "(brackets) ok", "über straße 9", "<|eot_id|> text", "Answer format: true/false")
"""Instructions checked at construction: the head + instruction + tail split must give the whole prompt's ids."""


class PromptTokens:
    """Ids of clean-template prompts, tokenizing only what differs between records.

    A clean prompt is ``HEAD + instruction + TAIL`` (``commonsense_prompts``). A tokenizer that pre-tokenizes as
    LLaMA-3's does (``fast_bpe.LLAMA3_SPLIT``, then byte-level; no normalizer; no added token that strips whitespace or
    holds a newline) never lets a pre-token cross the instruction's edges when the instruction starts with a
    non-space character (HEAD ends in ":\n", which ends a pre-token) and ends with an ASCII letter or digit (then
    TAIL's "\n\n" starts one): BPE works inside pre-tokens, so ids(prompt) == ids(HEAD) + ids(instruction) +
    ids(TAIL), exactly. HEAD and TAIL are tokenized once, and a build tokenizes a fifth fewer tokens (the
    170k-record benchmark: 24.0 M -> 19.8 M tokens). Any other tokenizer, ``reference_whitespace``, or an instruction
    that fails the edge test is tokenized whole; so is everything when the probes disagree (never seen).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reference_whitespace: bool) -> None:
        self.reference_whitespace = reference_whitespace
        self.parts: tuple[list[int], list[int]] | None = None
        if reference_whitespace or not pretokenizes_as_llama3(tokenizer):
            return
        head, tail = build_train_prompt("\0", "").split("\0")
        head_ids, tail_ids = encode_texts(tokenizer, [head, tail])
        self.parts = (head_ids, tail_ids)
        whole = encode_texts(tokenizer, [build_train_prompt(p, "") for p in _PROBES])
        if [head_ids + ids + tail_ids for ids in encode_texts(tokenizer, list(_PROBES))] != whole:
            self.parts = None  # never seen: the proof above holds for LLaMA-3's pre-tokenizer

    def texts(self, instructions: list[str]) -> list[str]:
        """What to tokenize for these prompts: the instruction itself (the same object) where the split is exact,
        else the whole prompt."""
        ws, parts = self.reference_whitespace, self.parts
        return [i if parts is not None and _ends_pre_tokens(i) else build_train_prompt(i, "", reference_whitespace=ws)
                for i in instructions]

    def ids(self, instructions: list[str], texts: list[str], encoded: list[list[int]], bos: int | None
            ) -> list[list[int]]:
        """The prompts' ids without BOS (``drop_bos``) from ``encoded``, the ids of ``texts`` =
        ``texts(instructions)``."""
        if self.parts is None:
            return drop_bos(encoded, bos)
        head, tail = self.parts  # HEAD starts with the preamble: no BOS to drop
        return [[*head, *ids, *tail] if text is instruction else drop_bos([ids], bos)[0]
                for instruction, text, ids in zip(instructions, texts, encoded, strict=True)]


def _ends_pre_tokens(instruction: str) -> bool:
    """Whether an instruction starts with a character that is not whitespace and ends with an ASCII letter or digit
    (the edges where LLaMA-3's pre-tokenizer always ends a pre-token; ASCII, to stay inside what Python and the Rust
    regex agree on)."""
    first, last = instruction[:1], instruction[-1:]
    return first.isascii() and not first.isspace() and last.isascii() and last.isalnum()


def train_example(parts: Sequence[list[int]], prompt_len: int, enc: Encoding, train_on_inputs: bool,
                  add_eos: bool) -> tuple[list[int], int, bool]:
    """Build <bos> text <eos>; return its ids, how many leading positions are untrained, and whether it was cut
    at cutoff_len.

    ``parts`` joined are the prompt + output ids without BOS (given in parts so that they are copied once, into
    the row), ``prompt_len`` how many of them are prompt. Every position is trained (the reference trains on the
    prompt too); with ``train_on_inputs=False`` BOS and the first ``prompt_len`` positions are not (-100
    labels). EOS is kept only when the whole sequence fits.
    """
    ids = [enc.bos] if enc.bos is not None else []
    first = len(ids) + prompt_len
    for part in parts:
        ids += part
    if add_eos and enc.eos is not None:
        ids.append(enc.eos)
    truncated = len(ids) > enc.cutoff_len
    del ids[enc.cutoff_len:]
    return ids, 0 if train_on_inputs else min(first, len(ids)), truncated


def eval_prompt(prompt: list[int], enc: Encoding, task: str, index: int, path: Path) -> list[int]:
    """<bos> prompt, whole (the reference never cuts an eval prompt).

    Raises:
        RecordError: the prompt is longer than ``max_eval_prompt_len``; the message names task and record.
    """
    ids = ([enc.bos] if enc.bos is not None else []) + prompt
    limit = enc.max_eval_prompt_len
    if limit is not None and len(ids) > limit:
        raise RecordError(
            f"{path}: record {index} (eval task {task}) is a {len(ids)}-token prompt, longer than "
            f"max_eval_prompt_len={limit}. Eval prompts are never cut (the reference feeds them whole): raise "
            f"max_eval_prompt_len, or leave it null to allow anything the model's context holds."
        )
    return ids


def collate_train(examples: list[dict[str, Any]], pad_id: int, pack_width: int | None = None) -> dict[str, Any]:
    """A loss batch (``batch`` module): right-padded with the pad id, -100 in labels, 0 in attention_mask; or,
    given ``pack_width``, the same samples packed into rows of at most that many tokens (``batch.pack``: the
    same loss, next to no padding)."""
    ids = [e["input_ids"] for e in examples]
    if pack_width is not None:
        return pack(ids, [e["labels"] for e in examples], pad_id, pack_width)
    return {"input_ids": pad(ids, pad_id, "right"),  # (B, T)
            "attention_mask": pad_mask(ids, "right"),  # (B, T)
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX, "right")}  # (B, T)


def collate_generate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A generation-only batch (``batch`` module): prompts LEFT-padded, so generation continues every row from
    its last column, with their task, answer and integer sample id."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_id, "left"),  # (B, P)
        "attention_mask": pad_mask(ids, "left"),  # (B, P)
        "task": [e["task"] for e in examples],
        "answer": [e["answer"] for e in examples],
        "sample_id": torch.tensor([e["sample_id"] for e in examples], dtype=torch.long),  # (B,)
    }


class LossRows(Dataset):
    """Teacher-forced examples over token rows: ``{"input_ids", "labels"}`` as int64 arrays."""

    def __init__(self, rows: TokenRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray(self.rows.ids_of(index), np.int64), "labels": self.rows.labels_of(index)}


class PromptRows(Dataset):
    """Generation examples: a prompt row with its task, answer and sample id."""

    def __init__(self, rows: TokenRows, tasks: list[str], answers: list[str], sample_ids: list[int]) -> None:
        self.rows, self.tasks, self.answers, self.sample_ids = rows, tasks, answers, sample_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": np.asarray(self.rows.ids_of(index), np.int64), "task": self.tasks[index],
                "answer": self.answers[index], "sample_id": self.sample_ids[index]}
