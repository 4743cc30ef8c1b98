"""LightningDataModule for commonsense reasoning in the LLM-Adapters layout (commonsense_170k + 8 test sets).

Batches follow the contract of ``batch`` (all tensors are LongTensor):

* training / validation loss, right-padded::

    {"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}   # -100 on padding (and prompt if masked)

* generation (validation subset and test), LEFT-padded prompts ending in "### Response:\\n", generation only,
  so the prompt is under ``input_ids``::

    {"input_ids": (B, P), "attention_mask": (B, P), "task": list[str], "answer": list[str], "sample_id": (B,)}

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

Setup speed (the ids are those above, byte for byte): a clean prompt's fixed head and tail are tokenized once
where that is exact (``PromptTokens``), and the next chunk is tokenized in a worker thread while this one's
rows are built (``EncodeAhead``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from effilora_lightning.data.batch import is_generation_batch
from effilora_lightning.data.commonsense_examples import (
    Encoding,
    LossRows,
    PromptRows,
    PromptTokens,
    UsableRecords,
    collate_generate,
    collate_train,
    drop_bos,
    eval_prompt,
    load_records,
    token_ids,
    train_example,
)
from effilora_lightning.data.commonsense_prompts import TASKS, build_eval_prompt, build_train_prompt
from effilora_lightning.data.memory import release_freed_memory
from effilora_lightning.data.node_build import Shard, load_or_build_for
from effilora_lightning.data.records import RecordError, check_data_file, read_records
from effilora_lightning.data.sampling import TrainingOrder
from effilora_lightning.data.split import seeded_split
from effilora_lightning.data.token_cache import EntryBuilder, TokenRowsWriter, file_digest
from effilora_lightning.data.tokenizer import EncodeAhead, encode_texts, load_tokenizer

__all__ = ["SAMPLE_ID_STRIDE", "CommonsenseDataModule", "RecordError", "is_generation_batch", "read_records"]

_CHUNK = 1024  # records tokenized per tokenizer call in setup (2048: 27 MiB more peak RSS on the 170k file, no faster)
MIN_RECORDS_PER_PIECE = 200_000
"""``build_workers=None`` forks a commonsense build piece only for this many records per piece: on 2 CPUs 170k
records built in 15-17 s in one process, 15-21 s in two, and each piece took memory of its own (BENCHMARKS.md).
Every piece also parses the whole file to find its slice, but that is 0.34 s at 170k (a validated pass over the
90 MiB file, 2026-12-05), not why pieces do not pay there."""
_NOT_IN_KEY = ("batch_size", "eval_batch_size", "num_workers", "group_by_length", "length_group_batches",
               "pack_sequences", "pack_width", "data_path", "dataset_dir")  # settings that change no token (the files are keyed by their digests)

SAMPLE_ID_STRIDE = 10_000_000
"""sample_id = task index * SAMPLE_ID_STRIDE + record index (test sets are far smaller than the stride)."""


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
        pack_sequences: loss batches (training and validation loss) packed several samples to a row of at
            most ``pack_width`` tokens, each attending only to itself (``batch.pack``): the same samples per step
            and the same loss and gradients as padded batches, with next to no padding. (SDPA and eager still
            compute each row's attention over the whole row, masked; FlashAttention-2 skips the masked part.) Unlike ``group_by_length`` it keeps the batch's task mix
            (length-grouped batches are one task each, which costs accuracy: BENCHMARKS.md). Needs a model that
            reads packed ``position_ids`` (Hugging Face's LLaMA with SDPA, eager or FlashAttention-2).
        cache_dir: where tokenized splits are cached (``token_cache``); None: ``default_cache_dir()``.
        use_cache: False tokenizes at every setup and writes nothing.
        build_workers: processes that tokenize a cold training file side by side, per rank (this one and forked
            copies, ``node_build.build_pieces``); None: this rank's share of the CPUs, for files of at least
            ``MIN_RECORDS_PER_PIECE`` (200,000) records per process: each piece reads the whole file and a
            record tokenizes so fast that at 170k records 2 pieces were no faster on 2 CPUs and took 420 MiB more
            (BENCHMARKS.md). The cache bytes do not depend on it.

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
        pack_sequences: bool = False,
        pack_width: int | None = None,
        cache_dir: str | None = None,
        use_cache: bool = True,
        build_workers: int | None = None,
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
        if build_workers is not None:
            _check_positive(build_workers=build_workers)
        if pack_width is not None and pack_width < cutoff_len:
            raise ValueError(f"pack_width={pack_width} is shorter than cutoff_len={cutoff_len}: a sequence of "
                             "cutoff_len tokens would fit no packed row. Use pack_width >= cutoff_len, or null.")
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
        self._usable_count: int | None = None
        """Per part ("train", "test"): whether this process tokenized it (False: read from the cache)."""
        self._train: LossRows | None = None
        self._val: LossRows | None = None
        self._test: PromptRows | None = None
        self._order = TrainingOrder(type(self).__name__)

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, then the training file (fit/validate) and the test sets: from the token cache
        when an entry for exactly these inputs exists, else validated, tokenized and cached (the ranks of a node
        each a slice, see ``token_cache``; then every rank memory-maps the one entry)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer_path, self.hparams.pad_token)
        if stage in (None, "fit", "validate") and self._train is None:
            data = file_digest(check_data_file(self.data_path))
            self._usable_count = None
            rows, meta = load_or_build_for(self, "train", self._build_train_val, _NOT_IN_KEY, self._merge_train_val,
                                           self._count_usable, min_per_piece=MIN_RECORDS_PER_PIECE,
                                           inputs={"data": data})
            self._train, self._val = LossRows(rows["train"]), LossRows(rows["val"])
            self.num_truncated_train, self.num_fully_masked = meta["truncated"], meta["fully_masked"]
            self._note_skipped(self.data_path, meta["skipped"])
            self._warn_counts("train", self.num_truncated_train, "training sequences were cut at cutoff_len")
        if self._test is None:
            files = {task: file_digest(check_data_file(self._test_file(task))) for task in self.eval_tasks}
            rows, meta = load_or_build_for(self, "test", self._build_test, _NOT_IN_KEY, _merge_test,
                                           inputs={"files": files})
            self._test = PromptRows(rows["prompts"], meta["tasks"], meta["answers"], meta["sample_ids"])
            self.longest_eval_prompt = tuple(meta["longest"]) if meta["longest"] else None
            for task, skipped in meta["skipped"].items():
                self._note_skipped(self._test_file(task), skipped)

    def _test_file(self, task: str) -> Path:
        path = self.dataset_dir / task / "test.json"
        if not path.parent.is_dir():
            raise FileNotFoundError(f"eval task {task!r}: directory {path.parent} does not exist "
                                    f"(dataset_dir={self.dataset_dir} must hold <task>/test.json)")
        return path

    def _prompt_tokens(self) -> PromptTokens:
        """One ``PromptTokens`` per tokenizer (its construction checks the split on probe prompts)."""
        key = (id(self.tokenizer), self.hparams.reference_whitespace)
        if getattr(self, "_prompts", (None,))[0] != key:
            self._prompts = (key, PromptTokens(self.tokenizer, self.hparams.reference_whitespace))
        return self._prompts[1]

    def _encoding(self) -> Encoding:
        tok, hp = self.tokenizer, self.hparams
        return Encoding(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, hp.cutoff_len, hp.max_eval_prompt_len)

    def _count_usable(self) -> int:
        """Usable records of the training file: one pass, once per setup (forked build pieces inherit it)."""
        if self._usable_count is None:
            self._usable_count = UsableRecords(self.data_path, ("instruction", "output", "answer"),
                                               self.hparams.on_bad_record).count()
            release_freed_memory()  # the count pass parsed every record
        return self._usable_count

    def _build_train_val(self, entry: EntryBuilder, shard: Shard) -> dict[str, Any]:
        """Validate the training file, split off the seeded validation records, tokenize ``shard``'s slice of
        each into ``entry``'s rows "train" and "val"; returns the counts (``_merge_train_val`` sums the parts').

        Two streamed passes, never the file's records in memory: one counts the usable records (the split
        depends on their number), the second tokenizes the training records a chunk at a time as they are
        read and keeps the ``val_set_size`` held-out ones for last."""
        usable = UsableRecords(self.data_path, ("instruction", "output", "answer"), self.hparams.on_bad_record)
        count, val_size = self._count_usable(), self.hparams.val_set_size
        if val_size >= count:
            raise ValueError(f"val_set_size={val_size} leaves no training records: {self.data_path} has "
                             f"{count} usable records")
        split = seeded_split(count, val_size, self.hparams.seed)
        mine = shard.of(range(len(split.train)))  # this part's slice of the training positions
        train_slice = range(split.train[mine.start], split.train[mine.stop - 1] + 1) if len(mine) else range(0)
        held = set(split.held_out)
        held_mine = set(shard.of(split.held_out))
        val: list[dict[str, str]] = []

        def train_records() -> Iterator[dict[str, str]]:
            for position, (_, record) in enumerate(usable):
                if position in held:
                    if position in held_mine:
                        val.append(record)
                elif position in train_slice:
                    yield record

        train = entry.rows("train")
        truncated, fully_masked = self._tokenize_train(train_records(), train)
        self._tokenize_train(iter(val), entry.rows("val"))
        return {"truncated": truncated, "fully_masked": fully_masked, "skipped": usable.skipped,
                "train_rows": train.rows, "train_records": len(split.train)}

    def _merge_train_val(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The training entry's counts from its parts' (each part read the whole file: "skipped" is the
        file's, not summed), after the check that needs all of them."""
        if not sum(part["train_rows"] for part in parts):
            raise RecordError(
                f"{self.data_path}: no training sequence is left: the prompt of each of its "
                f"{parts[0]['train_records']} training records fills cutoff_len={self.hparams.cutoff_len}, and "
                "train_on_inputs=False leaves them no label. Raise cutoff_len or set train_on_inputs=True.")
        return {"truncated": sum(part["truncated"] for part in parts),
                "fully_masked": sum(part["fully_masked"] for part in parts), "skipped": parts[0]["skipped"]}

    def _tokenize_train(self, records: Iterator[dict[str, str]], writer: TokenRowsWriter) -> tuple[int, int]:
        """Rows of prompt + output ids into ``writer`` (see the module docstring for why the clean template and
        ``reference_whitespace`` tokenize differently), ``_CHUNK`` records at a time so that only one chunk's
        Python lists of ids exist at once; returns how many were cut and dropped fully masked."""
        truncated_count, fully_masked = 0, 0
        enc, ws = self._encoding(), self.hparams.reference_whitespace
        train_on_inputs, add_eos = self.hparams.train_on_inputs, self.hparams.add_eos  # (read once, not per row)
        prompts = self._prompt_tokens()

        def chunks() -> Iterator[tuple[list[dict[str, str]], list[str], list[str], list[str]]]:
            """Each chunk with its instructions, what its prompts tokenize, and its other texts: the distinct
            outputs (clean template; a handful of "the correct answer is ..." strings) or, with
            ``reference_whitespace``, the whole prompt + output strings (the reference's ids)."""
            while chunk := list(itertools.islice(records, _CHUNK)):
                instructions = [r["instruction"] for r in chunk]
                rest = [build_train_prompt(r["instruction"], r["output"], reference_whitespace=True) for r in chunk] \
                    if ws else list(dict.fromkeys(r["output"] for r in chunk))
                yield chunk, instructions, prompts.texts(instructions), rest

        # every text of a chunk goes to the worker: an encoder call from this thread would wait behind its chunk
        for (chunk, instructions, texts, rest), encoded in EncodeAhead(self.tokenizer).map(
                chunks(), lambda item: item[2] + item[3]):
            prompt_ids = prompts.ids(instructions, texts, encoded[: len(chunk)], enc.bos)
            if ws:
                parts = [(text,) for text in drop_bos(encoded[len(chunk):], enc.bos)]
            else:
                output_ids = dict(zip(rest, drop_bos(encoded[len(chunk):], enc.bos)))
                parts = [(prompt, output_ids[r["output"]]) for prompt, r in zip(prompt_ids, chunk)]
            for row_parts, prompt in zip(parts, prompt_ids, strict=True):
                ids, untrained, truncated = train_example(row_parts, len(prompt), enc, train_on_inputs, add_eos)
                truncated_count += truncated
                if untrained == len(ids):
                    fully_masked += 1  # the prompt filled cutoff_len: nothing left to learn from
                    continue
                writer.add_masked(ids, untrained)
        return truncated_count, fully_masked

    def _build_test(self, entry: EntryBuilder, shard: Shard) -> dict[str, Any]:
        """Validate each eval task's test.json and tokenize ``shard``'s slice of all their records, in task order,
        into the generation prompts of row set "prompts" (``_merge_test`` joins the parts)."""
        enc, writer = self._encoding(), entry.rows("prompts")
        meta: dict[str, Any] = {"tasks": [], "answers": [], "sample_ids": [], "longest": None, "skipped": {}}
        every = []
        for task in self.eval_tasks:
            path = self._test_file(task)
            records, skipped = load_records(path, ("instruction", "answer"), self.hparams.on_bad_record, task)
            if skipped:
                meta["skipped"][task] = skipped
            cap = self.hparams.max_test_samples_per_task
            every += [(task, path, index, record) for index, record in records[:cap]]
        mine = shard.of(every)
        ws = self.hparams.reference_whitespace
        prompts = self._prompt_tokens()  # clean eval prompts are the training prompts
        for start in range(0, len(mine), _CHUNK):  # a chunk at a time: 22k prompts at once held ~0.5 GB
            chunk = mine[start: start + _CHUNK]
            instructions = [r["instruction"] for *_, r in chunk]
            if ws:
                prompt_ids = token_ids(self.tokenizer, [build_eval_prompt(i, True) for i in instructions], enc.bos)
            else:
                texts = prompts.texts(instructions)
                prompt_ids = prompts.ids(instructions, texts, encode_texts(self.tokenizer, texts), enc.bos)
            for (task, path, index, record), ids in zip(chunk, prompt_ids, strict=True):
                ids = eval_prompt(ids, enc, task, index, path)
                meta["longest"] = max(meta["longest"] or (0, "", 0), (len(ids), task, index))
                writer.add_masked(ids, len(ids))
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
        hp = self.hparams
        lengths = self._train.rows.lengths.tolist() if hp.group_by_length else None
        sampler = self._order.sampler(getattr(self, "trainer", None), len(self._train), hp.batch_size, hp.seed,
                                      lengths, batches_per_window=hp.length_group_batches)
        return DataLoader(self._train, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=self._collate_loss(),
                          num_workers=self.hparams.num_workers)

    def _collate_loss(self) -> partial:
        hp = self.hparams
        width = (hp.pack_width or 2 * hp.cutoff_len) if hp.pack_sequences else None
        return partial(collate_train, pad_id=self.tokenizer.pad_token_id, pack_width=width)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch, so that a resumed run continues the same data order."""
        return self._order.state_dict(getattr(self, "trainer", None), self.hparams.batch_size)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Remember the checkpoint's position; the next ``train_dataloader`` skips what it had consumed."""
        self._order.load_state_dict(state_dict)

    def val_dataloader(self) -> list[DataLoader]:
        """[loss loader over the held-out split, generation loader over a capped test subset], each if enabled."""
        self._require(self._train, "validate")
        loaders = []
        if self._val:
            loaders.append(DataLoader(self._val, batch_size=self.hparams.batch_size, shuffle=False,
                                      collate_fn=self._collate_loss(),
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


def _merge_test(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The test entry's meta from its parts' (in order): the lists joined, the longest prompt of all; "skipped"
    counts each file once (every part read every file)."""
    longest = [part["longest"] for part in parts if part["longest"]]
    return {"tasks": [t for part in parts for t in part["tasks"]],
            "answers": [a for part in parts for a in part["answers"]],
            "sample_ids": [i for part in parts for i in part["sample_ids"]],
            "longest": max(longest) if longest else None, "skipped": parts[0]["skipped"]}


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
