"""The dataset and collator of visual instruction tuning: cached token rows + images loaded per item.

Batches follow the contract of ``batch`` (B samples, N images in the batch, T/P the padded lengths):
    input_ids       LongTensor (B, T)  right-padded with the pad id; IMAGE_TOKEN_INDEX (-200) per image
    labels          LongTensor (B, T)  -100 on padding, system, user turns and images
    attention_mask  LongTensor (B, T)  1 on tokens (image placeholders included), 0 on padding
    images          FloatTensor (N, 3, S, S), normalised; N = image_counts.sum(), may be 0
    image_counts    LongTensor (B,)    images of each sample, in order: sample b owns the next image_counts[b]
    sample_id       LongTensor (B,)    the record's index in its file: unique, the same in every run
    sample_name     list[str] (B)      the record's "id" (what messages and reports name)
and in validation/test batches also the generation prompt (everything before the last reply):
    prompt_input_ids       LongTensor (B, P) left-padded with the pad id
    prompt_attention_mask  LongTensor (B, P)
    answer                 list[str] (B), the last gpt reply
    task                   list[str] (B), VISUAL_TASK
Integer ids, not the records' strings: a distributed evaluation counts each sample once by its id, and a hash of
the strings (what the model did before) collides at around 1e5 samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batch import IGNORE_INDEX, pad, pad_mask
from .images import BadRecordError, load_images
from .token_cache import TokenRows

__all__ = ["VISUAL_TASK", "Sample", "VisualInstructionCollator", "VisualInstructionDataset"]

VISUAL_TASK = "vqa"
"""The task name of every visual generation sample (one accuracy: exact match of the normalised answer)."""


@dataclass(frozen=True)
class Sample:
    """What a dataset knows of one sample besides its tokens."""

    name: str  # the record's "id"
    sample_id: int  # the record's index in its file
    images: tuple[Path, ...]
    length: int  # tokens after truncation, one per image


class VisualInstructionDataset(Dataset):
    """Token rows (already checked, truncated and labelled at setup) -> items with their images loaded.
    With ``prompts`` (validation/test) an item also holds the generation prompt and the answer."""

    def __init__(self, rows: TokenRows, sample_ids: list[int], names: list[str], images: list[list[str]],
                 image_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 image_mode: Literal["pad", "resize"], prompts: TokenRows | None = None,
                 answers: list[str] | None = None, skip_bad_images: bool = False) -> None:
        self.rows, self.sample_ids, self.names, self.images = rows, sample_ids, names, images
        self.prompts, self.answers = prompts, answers
        self.image_size = image_size
        self.image_args = (image_size, tuple(image_mean), tuple(image_std), image_mode)
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def generation(self) -> bool:
        return self.prompts is not None

    @property
    def lengths(self) -> list[int]:
        return self.rows.lengths.tolist()

    @property
    def has_image(self) -> list[bool]:
        return [bool(paths) for paths in self.images]

    @property
    def samples(self) -> list[Sample]:
        """Every sample's name, id, images and length (built on demand: 665k objects are not kept around)."""
        return [Sample(name, sid, tuple(Path(p) for p in paths), int(n))
                for name, sid, paths, n in zip(self.names, self.sample_ids, self.images, self.rows.lengths)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample's item; with ``skip_bad_images``, an image that no longer loads (it did at setup) gives the
        next sample's item instead, with a warning, rather than ending the run."""
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            try:
                images = load_images(self.names[row], [Path(p) for p in self.images[row]], self.image_size,
                                     self.image_args)
            except BadRecordError as err:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"{err}; using the next sample instead (on_bad_record='skip')", stacklevel=2)
                continue
            return self._item(row, images)
        raise RuntimeError("no sample of this split has loadable images any more")

    def _item(self, row: int, images: Tensor) -> dict[str, Any]:
        item = {
            "input_ids": torch.from_numpy(np.asarray(self.rows.ids_of(row), np.int64)),
            "labels": torch.from_numpy(self.rows.labels_of(row, IGNORE_INDEX)),
            "images": images,
            "sample_id": self.sample_ids[row],
            "sample_name": self.names[row],
        }
        if self.prompts is not None:
            item |= {"prompt_input_ids": torch.from_numpy(np.asarray(self.prompts.ids_of(row), np.int64)),
                     "answer": self.answers[row], "task": VISUAL_TASK}
        return item


# ---------------------------------------------------------------------------------------------- collation


@dataclass
class VisualInstructionCollator:
    """Items -> a batch (module docstring); text-only and image samples mix freely."""

    pad_token_id: int
    image_size: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [it["input_ids"] for it in items]
        batch = {
            "input_ids": pad(ids, self.pad_token_id, "right"),  # (B, T)
            "labels": pad([it["labels"] for it in items], IGNORE_INDEX, "right"),  # (B, T)
            "attention_mask": pad_mask(ids, "right"),  # (B, T)
            "images": torch.cat([it["images"] for it in items])
            if items else torch.zeros(0, 3, self.image_size, self.image_size),  # (N, 3, S, S)
            "image_counts": torch.tensor([len(it["images"]) for it in items], dtype=torch.long),  # (B,)
            "sample_id": torch.tensor([it["sample_id"] for it in items], dtype=torch.long),  # (B,)
            "sample_name": [it["sample_name"] for it in items],
        }
        if "prompt_input_ids" in items[0]:
            prompts = [it["prompt_input_ids"] for it in items]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id, "left")  # (B, P)
            batch["prompt_attention_mask"] = pad_mask(prompts, "left")  # (B, P)
            batch["answer"] = [it["answer"] for it in items]
            batch["task"] = [it["task"] for it in items]
        return batch
