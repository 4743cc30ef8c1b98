"""The one batch contract between the DataModules and the LightningModules, and the one way to pad.

Both DataModules (commonsense, visual instruction) emit dicts with these keys; B is the batch size, T the
padded sequence length, P the padded prompt length, N the images in the batch, S the image side::

    key                    type / shape              in             meaning
    ---------------------  ------------------------  -------------  ---------------------------------------------
    input_ids              LongTensor (B, T)         loss           right-padded with the pad id; an image is one
                                                                    IMAGE_TOKEN_INDEX position (visual only)
    attention_mask         LongTensor (B, T)         loss           1 on tokens, 0 on padding
    labels                 LongTensor (B, T)         loss           IGNORE_INDEX (-100) on padding and untrained
                                                                    tokens, else the token id
    prompt_input_ids       LongTensor (B, P)         generation     the prompt, LEFT-padded with the pad id, so
                                                                    that generation continues every row from its
                                                                    last column (see ``generation_prompt``)
    prompt_attention_mask  LongTensor (B, P)         generation     1 on prompt tokens, 0 on the left padding
    answer                 list[str] (B)             generation     the reference answer
    task                   list[str] (B)             generation     the task the answer is scored as
    sample_id              LongTensor (B,)           generation     unique within a split and identical in every
                                                                    run: a distributed evaluation counts each id
                                                                    once (the distributed sampler pads with
                                                                    duplicates; ``metrics.TaskAccuracy``)
    images                 FloatTensor (N, 3, S, S)  visual         normalised; N = image_counts.sum(), may be 0
    image_counts           LongTensor (B,)           visual         sample b owns the next image_counts[b] images
    sample_name            list[str] (B)             visual         the record's own "id", for messages and reports

A batch is a loss batch, a generation batch, or both (LLaVA validation: the loss over the whole conversation
and a generation from its prompt). A generation-only batch (commonsense evaluation) holds its prompt under
``input_ids`` / ``attention_mask`` and has no ``labels``: there is no full sequence to put there, and the keys
read the same as Hugging Face's ``generate`` inputs. ``generation_prompt(batch)`` returns the prompt of either
kind, ``is_generation_batch(batch)`` tells them apart; never use the dataloader index or a key of one task.

Visual batches carry ``sample_id`` in training too (the record's index in its file); commonsense loss batches
carry none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "generation_prompt", "is_generation_batch", "is_loss_batch", "pad",
           "pad_mask"]

IGNORE_INDEX = -100
"""Label of a position that is not trained on (PyTorch's cross-entropy default ``ignore_index``)."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id of one image in ``input_ids``; never a real token id (they are >= 0)."""


def is_generation_batch(batch: Mapping[str, Any]) -> bool:
    """True when the batch carries prompts to generate from and answers to score them against.

    A batch may be a loss batch too (``is_loss_batch``): LLaVA validation batches are both.
    """
    return "answer" in batch


def is_loss_batch(batch: Mapping[str, Any]) -> bool:
    """True when the batch carries teacher-forced ``labels`` to compute a loss on."""
    return "labels" in batch


def generation_prompt(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """The left-padded prompt ids and mask of a generation batch, each (B, P).

    ``prompt_input_ids`` when the batch is also a loss batch (its ``input_ids`` are then the whole right-padded
    sequence), else ``input_ids``.
    """
    if "prompt_input_ids" in batch:
        return batch["prompt_input_ids"], batch["prompt_attention_mask"]
    return batch["input_ids"], batch["attention_mask"]


def pad(seqs: Sequence[Tensor | np.ndarray | Sequence[int]], value: float, side: Literal["left", "right"]
        ) -> Tensor:
    """Stack sequences of different lengths into one tensor, filling the short ones with ``value``.

    Each sequence is (t_i, *rest) with the same ``rest``; the result is (B, max t_i, *rest) with the dtype and
    device of the first tensor (lists and arrays become int64 token ids). ``side="right"`` keeps each row at the
    start (teacher forcing); ``side="left"`` puts it at the end (generation continues from the last column).

    Raises:
        ValueError: no sequences, or ``side`` is neither "left" nor "right".
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("pad needs at least one sequence")
    rows = [s if isinstance(s, Tensor) else torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in seqs]
    width = max(row.shape[0] for row in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)  # (B, T, *rest)
    for i, row in enumerate(rows):
        if side == "left":
            out[i, width - row.shape[0]:] = row
        else:
            out[i, : row.shape[0]] = row
    return out


def pad_mask(seqs: Sequence[Tensor | np.ndarray | Sequence[int]], side: Literal["left", "right"]) -> Tensor:
    """The attention mask of ``pad(seqs, ..., side)``: (B, max t_i) int64, 1 on the tokens, 0 on the padding."""
    return pad([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, side)
