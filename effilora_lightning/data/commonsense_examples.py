"""Commonsense records -> examples -> batches: validating a record, building the training sequence and the
generation prompt of one record, the two datasets over cached token rows, and the two collate functions.

Sequences are ``<bos> prompt output <eos>`` (see ``commonsense``' module docstring for why BOS is added here and
when EOS is kept); batches follow the contract of ``batch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from effilora_lightning.data.batch import IGNORE_INDEX, pad, pad_mask
from effilora_lightning.data.commonsense_prompts import ANSWER_PATTERNS
from effilora_lightning.data.records import RecordError, read_records
from effilora_lightning.data.token_cache import TokenRows
from effilora_lightning.data.tokenizer import encode_texts

__all__ = ["Encoding", "LossRows", "PromptRows", "collate_generate", "collate_train", "eval_prompt",
           "load_records", "record_problem", "token_ids", "train_example"]


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


def load_records(
    path: Path, required: tuple[str, ...], on_bad_record: str, task: str | None = None
) -> tuple[list[tuple[int, dict[str, str]]], int]:
    """Read and validate a file; return the usable (index, record) pairs and how many were skipped."""
    records, skipped = read_records(path, on_bad_record)
    usable = []
    for index, record in records:
        problem = record_problem(record, required, task)
        if problem is None:
            usable.append((index, record))
        elif on_bad_record == "error":
            raise RecordError(f"{path}: record {index}: {problem}. Fix the record or pass on_bad_record='skip'.")
        else:
            skipped += 1
    if not usable:
        raise RecordError(f"{path}: no usable records ({len(records)} read, {skipped} skipped)")
    return usable, skipped


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
    out = [ids_of[t] for t in texts]
    return [ids[1:] if bos is not None and ids[:1] == [bos] else ids for ids in out]


def train_example(text: list[int], prompt_len: int, enc: Encoding, train_on_inputs: bool,
                  add_eos: bool) -> tuple[dict[str, list[int]], bool]:
    """Build <bos> text <eos> with labels; return it and whether it was cut at cutoff_len.

    ``text`` is the prompt + output ids without BOS, ``prompt_len`` how many of them are prompt. Labels copy
    the ids (the reference trains on the prompt too); with ``train_on_inputs=False`` BOS and the first
    ``prompt_len`` positions are -100. EOS is kept only when the whole sequence fits.
    """
    head = [enc.bos] if enc.bos is not None else []
    ids = head + text + ([enc.eos] if add_eos and enc.eos is not None else [])
    truncated = len(ids) > enc.cutoff_len
    ids = ids[: enc.cutoff_len]
    masked = min(len(head) + prompt_len, len(ids))
    labels = list(ids) if train_on_inputs else [-100] * masked + ids[masked:]
    return {"input_ids": ids, "labels": labels}, truncated


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


def collate_train(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A loss batch (``batch`` module): right-padded with the pad id, -100 in labels, 0 in attention_mask."""
    ids = [e["input_ids"] for e in examples]
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
