"""LightningDataModule for commonsense reasoning in the LLM-Adapters layout (commonsense_170k + 8 test sets).

Batches (all tensors are LongTensor):

* training / validation loss, right-padded::

    {"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}   # -100 on padding (and prompt if masked)

* generation (validation subset and test), LEFT-padded prompts ending in "### Response:\\n"::

    {"input_ids": (B, T), "attention_mask": (B, T), "task": list[str], "answer": list[str], "sample_id": (B,)}

  ``sample_id`` is ``TASKS.index(task) * SAMPLE_ID_STRIDE + index of the record in its test.json``: unique
  across tasks and identical in every run, so a distributed evaluation can drop the duplicates that the
  distributed sampler pads with (see ``effilora_lightning.metrics.TaskAccuracy``).

``val_dataloader()`` returns a list: the loss loader over the held-out split of the training file (when
``val_set_size > 0``), then the generation loader over the first ``val_generation_samples_per_task`` records
of each eval task (when > 0). Tell them apart with ``is_generation_batch(batch)``, not by dataloader index.
``test_dataloader()`` returns the generation loader over all eval tasks (capped by
``max_test_samples_per_task``).

Sequences are ``<bos> prompt output <eos>``: BOS is added here exactly once (the text is tokenized without
special tokens), EOS only when the sequence fits in ``cutoff_len``. Longer training sequences are cut at
``cutoff_len``, counted (``num_truncated_train``) and warned about once. Generation prompts are never cut (the
reference feeds them whole: real piqa prompts exceed 256 LLaMA-3 tokens); ``max_eval_prompt_len`` refuses
longer ones up front, naming task and record, and ``longest_eval_prompt`` lets the LightningModule check the
longest against the model's context before any step.

Token ids. With the clean template the prompt and the output are tokenized apart, so a training prompt is
token for token the generation prompt. With ``reference_whitespace=True`` the ids are LLM-Adapters'
``finetune.py``'s: the whole prompt + output string is tokenized at once (tokenizing the two apart changes the
ids at the boundary, e.g. ``['\n', 16 spaces, 'the']`` vs ``['\n', 15 spaces, ' the']``), and with
``train_on_inputs=False`` the first ``len(tokenize(prompt))`` positions are masked, as the reference does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from effilora_lightning.data.batch import IGNORE_INDEX, is_generation_batch, pad, pad_mask
from effilora_lightning.data.records import RecordError, check_data_file, read_records
from effilora_lightning.data.sampling import (
    ModalityLengthGroupedSampler,
    ResumableSampler,
    checked_position,
    require_training_batches,
    resume_sampler,
    training_position,
)
from effilora_lightning.data.templates import ANSWER_PATTERNS, TASKS, build_eval_prompt, build_train_prompt
from effilora_lightning.data.token_cache import (
    EntryBuilder,
    TokenRows,
    TokenRowsWriter,
    cache_key,
    default_cache_dir,
    file_digest,
    load_or_build_on_node,
    tokenizer_digest,
)
from effilora_lightning.data.tokenizer import encode_texts, load_tokenizer

__all__ = ["SAMPLE_ID_STRIDE", "CommonsenseDataModule", "RecordError", "is_generation_batch", "read_records"]

_CHUNK = 8192  # records tokenized per tokenizer call in setup

SAMPLE_ID_STRIDE = 10_000_000
"""sample_id = task index * SAMPLE_ID_STRIDE + record index (test sets are far smaller than the stride)."""


# ---------------------------------------------------------------------------------------------- reading


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


# ---------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class _Encoding:
    """Token ids shared by every example: BOS/EOS/pad and the length limits."""

    bos: int | None
    eos: int | None
    pad: int
    cutoff_len: int
    max_eval_prompt_len: int | None = None


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], bos: int | None) -> list[list[int]]:
    """Tokenize without special tokens (so BOS is never doubled), dropping a BOS the text itself spelled out.
    Each distinct text is tokenized once (the outputs are a handful of "the correct answer is ..." strings)."""
    unique = list(dict.fromkeys(texts))
    ids_of = dict(zip(unique, encode_texts(tokenizer, unique)))
    out = [ids_of[t] for t in texts]
    return [ids[1:] if bos is not None and ids[:1] == [bos] else ids for ids in out]


def train_example(text: list[int], prompt_len: int, enc: _Encoding, train_on_inputs: bool,
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


def generation_prompt(prompt: list[int], enc: _Encoding, task: str, index: int, path: Path) -> list[int]:
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


class _LossRows(Dataset):
    """Teacher-forced examples over token rows: ``{"input_ids", "labels"}`` as int64 arrays."""

    def __init__(self, rows: TokenRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray(self.rows.ids_of(index), np.int64), "labels": self.rows.labels_of(index)}


class _PromptRows(Dataset):
    """Generation examples: a prompt row with its task, answer and sample id."""

    def __init__(self, rows: TokenRows, tasks: list[str], answers: list[str], sample_ids: list[int]) -> None:
        self.rows, self.tasks, self.answers, self.sample_ids = rows, tasks, answers, sample_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": np.asarray(self.rows.ids_of(index), np.int64), "task": self.tasks[index],
                "answer": self.answers[index], "sample_id": self.sample_ids[index]}


# ---------------------------------------------------------------------------------------------- module


class CommonsenseDataModule(LightningDataModule):
    """Commonsense fine-tuning and generation-based evaluation on the 8 LLM-Adapters tasks.

    Args:
        data_path: training file, a JSON list or JSON Lines of {instruction, input, output, answer}.
        dataset_dir: directory holding ``<task>/test.json`` for every eval task.
        tokenizer_path: local checkpoint directory with the tokenizer (never downloaded).
        eval_tasks: task directory names to evaluate; None means all 8 (``TASKS``).
        val_set_size: records of the training file held out (seeded) for the validation loss; 0 for none.
        val_generation_samples_per_task: first records of each eval task generated from during validation.
        cutoff_len: maximum tokens per training sequence (BOS and EOS included).
        max_eval_prompt_len: longest generation prompt accepted (BOS included); None accepts any, leaving the
            LightningModule to check the longest (``longest_eval_prompt``) against the model's context.
        train_on_inputs: True (reference default) trains on prompt tokens too; False masks them with -100.
        add_eos: append EOS to training sequences that fit in ``cutoff_len``.
        batch_size: training and validation-loss batch size.
        eval_batch_size: generation batch size.
        num_workers: DataLoader workers.
        max_test_samples_per_task: keep only the first N records of each test set (None keeps all).
        on_bad_record: "error" raises on the first malformed record; "skip" drops it, counts and warns.
        pad_token: pad token to use (see ``load_tokenizer``); None picks a reserved special token.
        reference_whitespace: use LLM-Adapters' literal prompt whitespace instead of the clean template.
        seed: seeds the validation split and the training shuffle.
        group_by_length: training batches of similar lengths (shuffled windows of ``length_group_batches``
            global batches, each sorted by length) instead of a plain shuffle: far less padding.
        length_group_batches: batches per length-sorted window (Hugging Face's megabatch: 50).
        cache_dir: where tokenized splits are cached (``token_cache``); None: ``default_cache_dir()``.
        use_cache: False tokenizes at every setup and writes nothing.

    Raises:
        ValueError: unknown eval task or invalid argument; ``RecordError`` (a ValueError) for bad data.
        FileNotFoundError: a data file, task directory or tokenizer is missing.
    """

    def __init__(
        self,
        data_path: str,
        dataset_dir: str,
        tokenizer_path: str,
        eval_tasks: list[str] | None = None,
        val_set_size: int = 0,
        val_generation_samples_per_task: int = 8,
        cutoff_len: int = 256,
        max_eval_prompt_len: int | None = None,
        train_on_inputs: bool = True,
        add_eos: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_test_samples_per_task: int | None = None,
        on_bad_record: Literal["error", "skip"] = "error",
        pad_token: str | None = None,
        reference_whitespace: bool = False,
        seed: int = 42,
        group_by_length: bool = False,
        length_group_batches: int = 50,
        cache_dir: str | None = None,
        use_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.eval_tasks = _check_tasks(list(TASKS) if eval_tasks is None else list(eval_tasks))
        _check_positive(cutoff_len=cutoff_len, batch_size=batch_size, eval_batch_size=eval_batch_size,
                        length_group_batches=length_group_batches)
        _check_non_negative(val_set_size=val_set_size, num_workers=num_workers,
                            val_generation_samples_per_task=val_generation_samples_per_task)
        if max_test_samples_per_task is not None:
            _check_positive(max_test_samples_per_task=max_test_samples_per_task)
        if max_eval_prompt_len is not None:
            _check_positive(max_eval_prompt_len=max_eval_prompt_len)
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.data_path, self.dataset_dir = Path(data_path), Path(dataset_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.num_skipped: dict[str, int] = {}
        self.num_truncated_train = 0
        self.num_fully_masked = 0
        self.longest_eval_prompt: tuple[int, str, int] | None = None
        """(length in tokens with BOS, task, record index) of the longest generation prompt, after setup."""
        self.built_cache: dict[str, bool] = {}
        """Per part ("train", "test"): whether this process tokenized it (False: read from the cache)."""
        self._train: _LossRows | None = None
        self._val: _LossRows | None = None
        self._test: _PromptRows | None = None
        self._resume: dict[str, int] | None = None  # from a checkpoint: epoch and batches already consumed

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, then the training file (fit/validate) and the test sets: from the token cache
        when an entry for exactly these inputs exists, else validated, tokenized and cached (by local rank 0;
        the other ranks wait and memory-map it)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer_path, self.hparams.pad_token)
        if stage in (None, "fit", "validate") and self._train is None:
            rows, meta = self._cached("train", self._build_train_val, data=file_digest(check_data_file(self.data_path)))
            self._train, self._val = _LossRows(rows["train"]), _LossRows(rows["val"])
            self.num_truncated_train, self.num_fully_masked = meta["truncated"], meta["fully_masked"]
            self._note_skipped(self.data_path, meta["skipped"])
            self._warn_counts("train", self.num_truncated_train, "training sequences were cut at cutoff_len")
        if self._test is None:
            files = {task: file_digest(check_data_file(self._test_file(task))) for task in self.eval_tasks}
            rows, meta = self._cached("test", self._build_test, files=files)
            self._test = _PromptRows(rows["prompts"], meta["tasks"], meta["answers"], meta["sample_ids"])
            self.longest_eval_prompt = tuple(meta["longest"]) if meta["longest"] else None
            for task, skipped in meta["skipped"].items():
                self._note_skipped(self._test_file(task), skipped)

    def _cached(self, part: str, build: Callable[[EntryBuilder], dict[str, Any]], **inputs: Any
                ) -> tuple[dict[str, TokenRows], dict[str, Any]]:
        """``build()`` through the token cache, keyed by the inputs, the settings and the tokenizer."""
        hp, trainer = self.hparams, getattr(self, "trainer", None)
        settings = {k: v for k, v in hp.items() if k not in ("batch_size", "eval_batch_size", "num_workers",
                                                               "group_by_length", "length_group_batches",
                                                               "cache_dir", "use_cache", "data_path",
                                                               "dataset_dir", "tokenizer_path")}
        key = cache_key(owner=f"{type(self).__name__}.{part}", inputs=inputs, settings=settings,
                        tokenizer=tokenizer_digest(hp.tokenizer_path), pad=self.tokenizer.pad_token)
        cache_dir = (hp.cache_dir or default_cache_dir()) if hp.use_cache else None
        rows, meta, built = load_or_build_on_node(trainer, cache_dir, key, build, part)
        self.built_cache[part] = built
        return rows, meta

    def _test_file(self, task: str) -> Path:
        path = self.dataset_dir / task / "test.json"
        if not path.parent.is_dir():
            raise FileNotFoundError(f"eval task {task!r}: directory {path.parent} does not exist "
                                    f"(dataset_dir={self.dataset_dir} must hold <task>/test.json)")
        return path

    def _encoding(self) -> _Encoding:
        tok, hp = self.tokenizer, self.hparams
        return _Encoding(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hp.cutoff_len, hp.max_eval_prompt_len)

    def _build_train_val(self, entry: EntryBuilder) -> dict[str, Any]:
        """Validate the training file, split off the seeded validation records, tokenize both into ``entry``'s
        rows "train" and "val"; returns the counts."""
        records, skipped = load_records(self.data_path, ("instruction", "output", "answer"), self.hparams.on_bad_record)
        val_size = self.hparams.val_set_size
        if val_size >= len(records):
            raise ValueError(f"val_set_size={val_size} leaves no training records: {self.data_path} has "
                             f"{len(records)} usable records")
        order = list(range(len(records)))
        random.Random(self.hparams.seed).shuffle(order)
        val = [records[i][1] for i in sorted(order[:val_size])]
        train = entry.rows("train")
        truncated, fully_masked = self._tokenize_train([records[i][1] for i in sorted(order[val_size:])], train)
        if not train.rows:
            raise RecordError(
                f"{self.data_path}: no training sequence is left: the prompt of each of its {len(order) - val_size} "
                f"training records fills cutoff_len={self.hparams.cutoff_len}, and train_on_inputs=False leaves "
                "them no label. Raise cutoff_len or set train_on_inputs=True.")
        self._tokenize_train(val, entry.rows("val"))
        return {"truncated": truncated, "fully_masked": fully_masked, "skipped": skipped}

    def _tokenize_train(self, records: list[dict[str, str]], writer: TokenRowsWriter) -> tuple[int, int]:
        """Rows of prompt + output ids into ``writer`` (see the module docstring for why the clean template and
        ``reference_whitespace`` tokenize differently), ``_CHUNK`` records at a time so that only one chunk's
        Python lists of ids exist at once; returns how many were cut and dropped fully masked."""
        truncated_count, fully_masked = 0, 0
        enc, ws = self._encoding(), self.hparams.reference_whitespace
        for start in range(0, len(records), _CHUNK):
            chunk = records[start: start + _CHUNK]
            prompts = [build_train_prompt(r["instruction"], "", reference_whitespace=ws) for r in chunk]
            prompt_ids = _ids(self.tokenizer, prompts, enc.bos)
            if ws:  # the reference's ids: the whole string at once
                texts = [build_train_prompt(r["instruction"], r["output"], reference_whitespace=True) for r in chunk]
                text_ids = _ids(self.tokenizer, texts, enc.bos)
            else:
                output_ids = _ids(self.tokenizer, [r["output"] for r in chunk], enc.bos)
                text_ids = [p + o for p, o in zip(prompt_ids, output_ids)]
            for text, prompt in zip(text_ids, prompt_ids):
                example, truncated = train_example(text, len(prompt), enc, self.hparams.train_on_inputs,
                                                   self.hparams.add_eos)
                truncated_count += truncated
                trained = [label != -100 for label in example["labels"]]
                if not any(trained):
                    fully_masked += 1  # the prompt filled cutoff_len: nothing left to learn from
                    continue
                writer.add(example["input_ids"], trained)
        return truncated_count, fully_masked

    def _build_test(self, entry: EntryBuilder) -> dict[str, Any]:
        """Validate and tokenize each eval task's test.json into the generation prompts of row set "prompts"."""
        enc, writer = self._encoding(), entry.rows("prompts")
        meta: dict[str, Any] = {"tasks": [], "answers": [], "sample_ids": [], "longest": None, "skipped": {}}
        for task in self.eval_tasks:
            path = self._test_file(task)
            records, skipped = load_records(path, ("instruction", "answer"), self.hparams.on_bad_record, task)
            if skipped:
                meta["skipped"][task] = skipped
            records = records[: self.hparams.max_test_samples_per_task]
            prompts = [build_eval_prompt(r["instruction"], self.hparams.reference_whitespace) for _, r in records]
            for (index, record), ids in zip(records, _ids(self.tokenizer, prompts, enc.bos)):
                ids = generation_prompt(ids, enc, task, index, path)
                meta["longest"] = max(meta["longest"] or (0, "", 0), (len(ids), task, index))
                writer.add(ids, [False] * len(ids))
                meta["tasks"].append(task)
                meta["answers"].append(record["answer"])
                meta["sample_ids"].append(TASKS.index(task) * SAMPLE_ID_STRIDE + index)
        return meta

    def _note_skipped(self, path: Path, skipped: int) -> None:
        if skipped:
            self.num_skipped[str(path)] = skipped
            rank_zero_warn(f"{path}: skipped {skipped} malformed records (on_bad_record='skip')")

    def _warn_counts(self, what: str, count: int, message: str) -> None:
        if count:
            rank_zero_warn(f"{count} {message} ({self.hparams.cutoff_len}); see num_truncated_{what}")
        if self.num_fully_masked:
            rank_zero_warn(f"dropped {self.num_fully_masked} training sequences whose prompt filled cutoff_len "
                           "(train_on_inputs=False leaves them no label)")

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        """Shuffled right-padded loss batches; the order depends only on (seed, epoch) and resumes mid-epoch."""
        self._require(self._train, "fit")
        trainer = getattr(self, "trainer", None)
        require_training_batches(trainer)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        hp = self.hparams
        sampler: ResumableSampler
        if hp.group_by_length:
            lengths = self._train.rows.lengths.tolist()
            sampler = ModalityLengthGroupedSampler(lengths, [False] * len(lengths), hp.batch_size, world, rank,
                                                   hp.seed, batches_per_window=hp.length_group_batches)
        else:
            sampler = ResumableSampler(self._train, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed)
        if self._resume is not None:  # once: a reloaded loader starts whole
            resume_sampler(sampler, self._resume, self.hparams.batch_size)
            self._resume = None
        return DataLoader(self._train, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=partial(collate_train, pad_id=self.tokenizer.pad_token_id),
                          num_workers=self.hparams.num_workers)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch, so that a resumed run continues the same data order."""
        return training_position(getattr(self, "trainer", None), self.hparams.batch_size)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = checked_position(state_dict, type(self).__name__)

    def val_dataloader(self) -> list[DataLoader]:
        """[loss loader over the held-out split, generation loader over a capped test subset], each if enabled."""
        self._require(self._train, "validate")
        loaders = []
        if self._val:
            loaders.append(DataLoader(self._val, batch_size=self.hparams.batch_size, shuffle=False,
                                      collate_fn=partial(collate_train, pad_id=self.tokenizer.pad_token_id),
                                      num_workers=self.hparams.num_workers))
        cap = self.hparams.val_generation_samples_per_task
        tasks = self._test.tasks
        subset = [i for task in self.eval_tasks for i in [j for j, t in enumerate(tasks) if t == task][:cap]]
        if subset:
            loaders.append(self._generation_loader(Subset(self._test, subset)))
        return loaders

    def test_dataloader(self) -> DataLoader:
        """Left-padded generation batches over every eval task."""
        self._require(self._test, "test")
        return self._generation_loader(self._test)

    def _generation_loader(self, examples: Dataset) -> DataLoader:
        return DataLoader(examples, batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=partial(collate_generate, pad_id=self.tokenizer.pad_token_id),
                          num_workers=self.hparams.num_workers)

    @staticmethod
    def _require(data: object, stage: str) -> None:
        if data is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")


def _check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval_tasks {unknown}; valid tasks: {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"eval_tasks is empty; pick from: {', '.join(TASKS)} (or null for all)")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"eval_tasks lists a task twice: {tasks}")
    return tasks


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
