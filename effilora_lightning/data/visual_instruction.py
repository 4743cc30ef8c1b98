"""LightningDataModule for LLaVA-1.5 style visual instruction tuning (stage 1 and stage 2 share the schema).

Records are `{"id", "image" (str, a list of str, or absent), "conversations": [...]}` under `data_path`
(a JSON list or JSON Lines, told apart by content: `records`), images relative to `image_folder`.

Setup checks every record of every split the run will use (a fit builds the test split too, so a run never
trains to its end and then fails in the test after fit): the conversation (see
`conversation.validate_conversation`), that each image lies inside `image_folder` (unless
`allow_images_outside_folder`), exists and decodes (`image_check="decode"`, every pixel: a PNG whose data
is truncated behind an intact header fails here, not at step 1; `"header"` reads headers only, for sets too
large to decode at setup), and that its ids spell the template text. A bad record is an error naming the
sample id and path, or with `on_bad_record="skip"` it is dropped and counted in `stats[split]`; an image that
fails to load later all the same is then replaced by the next sample, with a warning, instead of ending the
run. Tokenization mismatches are always dropped and counted, and setup fails when their share
exceeds `max_mismatch_ratio`. Setup tokenizes every sample once (exact lengths for length grouping) into the
token cache (`visual_build`); items read their rows from it.

Preprocessing is given explicitly (`image_size`, `image_mean`, `image_std`, OpenAI CLIP defaults) rather than
read from the vision tower, so the DataModule builds without the model; the VisionLanguageModule should
compare them with `VisionTower.image_size/image_mean/image_std` and fail on a difference.

`max_length` counts text tokens with each image as ONE position (the LLaVA convention); the model adds
num_patches - 1 positions per image when it expands the placeholder. Training samples are truncated on the
right when the images and at least one supervised token survive, else dropped ("too_long"); evaluation
samples must fit whole.

Setup at scale: records are parsed as the file is read (`records.RecordStream`), checked and tokenized a batch
at a time into the token cache (`token_cache`), which every later run and every other rank of the node
memory-maps; images are checked in parallel threads, each file once. Batches: see `visual_dataset` (the
contract of both DataModules: `batch`).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from .chat_templates import check_template, get_template
from .conversation_checks import MismatchCounter
from .images import BadRecordError, preprocess_image, to_rgb
from .node_build import load_or_build_for
from .records import check_data_file
from .sampling import ModalityLengthGroupedSampler, TrainingOrder
from .token_cache import file_digest
from .tokenizer import load_tokenizer
from .visual_build import SplitBuilder
from .visual_dataset import VisualInstructionCollator, VisualInstructionDataset

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "BadRecordError",
    "ModalityLengthGroupedSampler",
    "VisualInstructionCollator",
    "VisualInstructionDataModule",
    "VisualInstructionDataset",
    "preprocess_image",
    "to_rgb",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_NOT_IN_KEY = ("batch_size", "eval_batch_size", "num_workers", "group_by_modality_length", "data_path",
               "val_data_path", "test_data_path")  # settings that change no token (files are keyed by digest)


class VisualInstructionDataModule(pl.LightningDataModule):
    """LLaVA-1.5 visual instruction data (module docstring: checks, batch format, preprocessing choice).

    Args:
        data_path: training records (a JSON list, or JSON Lines; UTF-8).
        image_folder: root the records' "image" paths are relative to.
        allow_images_outside_folder: accept image paths that lead out of `image_folder` ("../x.png", "/x.png").
        image_check: "decode" (every image fully decoded at setup) or "header" (headers only: faster on huge
            sets; an image that then fails to load is an error, or with on_bad_record="skip" replaced).
        tokenizer_path: local tokenizer directory (loaded by `load_tokenizer`, no download).
        template: "vicuna_v1" (LLaVA-1.5) or "llama3" (LLaMA-3 chat).
        image_size, image_mean, image_std: preprocessing; must match the vision tower.
        image_mode: "pad" (square with the mean colour, then resize) or "resize".
        max_length: token budget per sample, each image counted as one position.
        val_data_path / val_set_size: a validation file, or that many records split off the training file.
        test_data_path: test records; without it `test` uses the validation set.
        batch_size / eval_batch_size: per-device batch sizes for training and validation/test.
        on_bad_record: "error" stops at the first bad record; "skip" drops and counts it.
        max_mismatch_ratio: largest share of tokenization mismatches tolerated per split.
        group_by_modality_length: training order from `ModalityLengthGroupedSampler`, else a seeded shuffle
            (`ResumableSampler`); either resumes mid-epoch from a checkpoint (`state_dict`).
        seed: shuffling and the validation split.
        pad_token: explicit pad token for `load_tokenizer` (None: its default choice).
        system_prompt: replaces the template's system prompt ("" drops the system block; None keeps it).
        cache_dir: where checked and tokenized splits are cached (`token_cache`); None: `default_cache_dir()`.
        use_cache: False checks and tokenizes at every setup and writes nothing.
        build_workers: processes that check and tokenize a cold split side by side, per rank (this one and
            forked copies, `node_build.build_pieces`); None: this rank's share of the CPUs, for splits of at
            least 20,000 records per process. The cache bytes do not depend on it.
    """

    def __init__(
        self,
        data_path: str,
        image_folder: str,
        tokenizer_path: str,
        template: Literal["vicuna_v1", "llama3"] = "llama3",
        image_size: int = 336,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        image_mode: Literal["pad", "resize"] = "pad",
        max_length: int = 2048,
        val_data_path: str | None = None,
        val_set_size: int = 0,
        test_data_path: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        max_mismatch_ratio: float = 0.001,
        group_by_modality_length: bool = True,
        seed: int = 42,
        pad_token: str | None = None,
        system_prompt: str | None = None,
        allow_images_outside_folder: bool = False,
        image_check: Literal["decode", "header"] = "decode",
        cache_dir: str | None = None,
        use_cache: bool = True,
        build_workers: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_args(self.hparams)
        self.template = get_template(template)
        if system_prompt is not None:
            self.template = replace(self.template, system=system_prompt)
        self.tokenizer: Any = None
        self.datasets: dict[str, VisualInstructionDataset] = {}
        self.stats: dict[str, Counter[str]] = {}
        self.mismatches: dict[str, MismatchCounter] = {}
        self.built_cache: dict[str, bool] = {}
        """Per split: whether this process checked and tokenized it (False: memory-mapped from the cache)."""
        self._order = TrainingOrder(type(self).__name__)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and (once) every split the stage needs: from the token cache when an entry for
        exactly these inputs exists, else checked, tokenized and cached (the ranks of a node each a part, see
        ``token_cache``; then every rank memory-maps the one entry)."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer_path, pad_token=hp.pad_token)
            check_template(self.template, self.tokenizer)
        # a fit builds the test split too: the CLI tests after fit, and a bad test record must stop the run
        # before training, not after it
        wanted = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        builder = SplitBuilder(hp, self.template, self.tokenizer)  # one per setup: each file is counted once
        for split in [s for s in wanted or ("train", "val", "test") if s not in self.datasets]:
            source = self._source(split)
            if source is None:
                continue
            if split == "test" and "val" in self.datasets and source == self._source("val"):
                self.datasets["test"], self.stats["test"] = self.datasets["val"], self.stats["val"]  # same records
                self.mismatches["test"] = self.mismatches["val"]
            else:
                self._load_split(split, *source, builder)

    def _source(self, split: str) -> tuple[str, str] | None:
        """(file, part) a split is read from; part "all", or "train" / "held_out" of a val_set_size split."""
        hp = self.hparams
        if split == "train":
            return hp.data_path, "train" if hp.val_set_size else "all"
        if split == "val":
            return (hp.data_path, "held_out") if hp.val_set_size else (hp.val_data_path, "all") \
                if hp.val_data_path else None
        return (hp.test_data_path, "all") if hp.test_data_path else self._source("val")

    def _load_split(self, split: str, path: str, part: str, builder: SplitBuilder) -> None:
        hp, generation = self.hparams, split != "train"
        key_inputs = {"data": file_digest(check_data_file(path)), "part": part, "generation": generation}
        rows, meta = load_or_build_for(self, split, functools.partial(builder.build, split, path, part, generation),
                                       _NOT_IN_KEY, functools.partial(builder.merge, split, path, generation),
                                       functools.partial(builder.records_in, path, part), inputs=key_inputs, image_folder=os.path.abspath(hp.image_folder),
                                       template=asdict(self.template))
        self.datasets[split] = VisualInstructionDataset(
            rows["tokens"], meta["sample_ids"], meta["names"], meta["images"], hp.image_size, hp.image_mean, hp.image_std,
            hp.image_mode, prompts=rows.get("prompts"), answers=meta["answers"] if generation else None,
            skip_bad_images=hp.on_bad_record == "skip")
        self.stats[split] = Counter(meta["stats"])
        mismatch = meta["mismatch"]
        self.mismatches[split] = MismatchCounter(split, mismatch["seen"], mismatch["mismatched"],
                                                 [tuple(e) for e in mismatch["examples"]])
        if meta["json_skipped"]:
            rank_zero_warn(f"{path}: skipped {meta['json_skipped']} lines that are not valid JSON "
                           "(on_bad_record='skip')")
        rank_zero_info(f"visual instruction {split} ({path}): {dict(self.stats[split])}")

    def train_dataloader(self) -> DataLoader:
        """Training batches whose order depends only on (seed, epoch) and resumes mid-epoch from a checkpoint.

        Both samplers are DistributedSamplers that shard per rank, so Lightning uses them as they are.
        """
        data, hp = self.datasets["train"], self.hparams
        grouped = hp.group_by_modality_length
        sampler = self._order.sampler(self.trainer, len(data), hp.batch_size, hp.seed,
                                      data.lengths if grouped else None, data.has_image if grouped else None)
        return self._loader(data, hp.batch_size, sampler)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch, so that a run resumed from this checkpoint continues the same
        data order; empty outside of fitting."""
        return self._order.state_dict(self.trainer, self.hparams.batch_size)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Remember the checkpoint's position; the next `train_dataloader` skips what it had consumed."""
        self._order.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), self.hparams.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self.hparams.eval_batch_size, None)

    def _split(self, split: str) -> VisualInstructionDataset:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: set val_data_path or val_set_size (test: also test_data_path)")
        return self.datasets[split]

    def _loader(self, data: VisualInstructionDataset, batch_size: int, sampler: Sampler | None) -> DataLoader:
        hp = self.hparams
        collate = VisualInstructionCollator(self.tokenizer.pad_token_id, hp.image_size)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)


def _check_args(hp: Any) -> None:
    """Fail at construction on arguments that cannot work (files are checked in setup)."""
    get_template(hp.template)
    problems = []
    if hp.image_mode not in ("pad", "resize"):
        problems.append(f"image_mode must be 'pad' or 'resize', got {hp.image_mode!r}")
    if hp.on_bad_record not in ("error", "skip"):
        problems.append(f"on_bad_record must be 'error' or 'skip', got {hp.on_bad_record!r}")
    if hp.image_check not in ("decode", "header"):
        problems.append(f"image_check must be 'decode' or 'header', got {hp.image_check!r}")
    if not 0.0 <= hp.max_mismatch_ratio <= 1.0 or math.isnan(hp.max_mismatch_ratio):
        problems.append(f"max_mismatch_ratio must be in [0, 1], got {hp.max_mismatch_ratio}")
    if hp.val_data_path and hp.val_set_size:
        problems.append("give val_data_path or val_set_size, not both")
    if hp.build_workers is not None and hp.build_workers < 1:
        problems.append(f"build_workers must be >= 1 or null (one per CPU share), got {hp.build_workers}")
    if min(hp.image_size, hp.max_length, hp.batch_size, hp.eval_batch_size) < 1 or hp.val_set_size < 0:
        problems.append("image_size, max_length, batch_size and eval_batch_size must be >= 1, val_set_size >= 0")
    if len(hp.image_mean) != 3 or len(hp.image_std) != 3 or min(hp.image_std) <= 0:
        problems.append(f"image_mean/image_std need 3 values, std > 0; got {hp.image_mean}, {hp.image_std}")
    if problems:
        raise ValueError("VisualInstructionDataModule: " + "; ".join(problems))


