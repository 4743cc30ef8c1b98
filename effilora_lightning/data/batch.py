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
    position_ids           LongTensor (R, W)         packed loss    only in a PACKED loss batch (``pack``): R rows of
                                                                    W columns, each row several whole samples whose
                                                                    positions restart at 0; the model gets these
                                                                    instead of attention_mask (which stays, 1 on
                                                                    tokens, for counting)
    num_samples            int                       packed loss    the samples packed into the R rows
    packed_segments        tuple[tuple[int, ...]]    packed loss    per row, the lengths of its samples in order
                                                                    (the last one's with the row's tail): what
                                                                    ``attn_implementation: sdpa_packed`` reads
    images                 FloatTensor (N, 3, S, S)  visual         normalised; N = image_counts.sum(), may be 0
    image_counts           LongTensor (B,)           visual         sample b owns the next image_counts[b] images
    sample_name            list[str] (B)             visual         the record's own "id", for messages and reports

A batch is a loss batch, a generation batch, or both (LLaVA validation: the loss over the whole conversation
and a generation from its prompt). A generation-only batch (commonsense evaluation) holds its prompt under
``input_ids`` / ``attention_mask`` and has no ``labels``: there is no full sequence to put there, and the keys
read the same as Hugging Face's ``generate`` inputs. ``generation_prompt(batch)`` returns the prompt of either
kind, ``is_generation_batch(batch)`` tells them apart; never use the dataloader index or a key of one task.

A packed loss batch (``pack``, commonsense ``pack_sequences``) has no padding inside a sample's attention: Hugging
Face's models read the restarts of ``position_ids`` as sample boundaries when ``attention_mask`` is None (SDPA and
eager build a block-diagonal causal mask, FlashAttention-2 runs variable-length), so each sample sees only itself
and the loss and gradients are the padded batch's (tested). ``num_samples(batch)`` counts the samples of either kind.
``packed_segments`` says the same on the host, for ``models.packed_attention`` (one SDPA call per sample, no mask);
``model_inputs(batch, segments=True)`` passes it to the model.

Visual batches carry ``sample_id`` in training too (the record's index in its file); commonsense loss batches
carry none.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "generation_prompt", "is_generation_batch", "is_loss_batch",
           "is_packed", "model_inputs", "num_samples", "pack", "pack_rows", "packed_rows", "pad", "pad_mask"]

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


def is_packed(batch: Mapping[str, Any]) -> bool:
    """True for a packed loss batch (``pack``): rows of several samples, told apart by ``position_ids``."""
    return "position_ids" in batch


def model_inputs(batch: Mapping[str, Any], segments: bool = False) -> dict[str, Any]:
    """The keyword arguments of a Hugging Face causal LM's forward for a (padded or packed) loss batch.

    Packed: ``position_ids`` and no ``attention_mask`` (HF reads sample boundaries from the position restarts only
    when the mask is None), and ``use_cache=False`` (with a cache the boundaries are not looked for and every
    sample would attend to the ones before it in its row); with ``segments`` also ``packed_segments``, for a model
    whose attention is ``sdpa_packed`` (other attention functions would receive it unused).
    """
    if is_packed(batch):
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        return inputs | {"packed_segments": batch["packed_segments"]} if segments else inputs
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def num_samples(batch: Mapping[str, Any]) -> int:
    """Samples in a loss batch: its rows, or a packed batch's ``num_samples`` (a Python int, no host sync)."""
    return int(batch["num_samples"]) if is_packed(batch) else int(batch["input_ids"].shape[0])


def pack_rows(lengths: Sequence[int], num_rows: int) -> list[list[int]]:
    """Samples (by index) in ``num_rows`` balanced rows: longest first, each to the least-filled row (the LPT
    rule; its fullest row is within 4/3 of the best possible). Deterministic in ``lengths``."""
    if not 1 <= num_rows <= max(len(lengths), 1):
        raise ValueError(f"pack_rows needs 1 <= num_rows <= {len(lengths)} samples, got {num_rows}")
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    fill = [(0, r) for r in range(num_rows)]  # a heap of (tokens, row): the least-filled row first
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, r = heapq.heappop(fill)
        rows[r].append(i)
        heapq.heappush(fill, (tokens + lengths[i], r))
    return rows


def packed_rows(lengths: Sequence[int], width: int | None = None) -> list[list[int]]:
    """The rows of a packed batch: ``pack_rows`` at the row count whose (rows x fullest row) is smallest, rows
    of at most ``width`` tokens (default: the longest sample). One sample per row (the right-padded batch) is
    always a candidate, so packing never computes more positions than padding; ties go to the narrower rows
    (less attention per row). Row counts are tried upward from the fewest that can hold the tokens until
    (rows x longest sample) reaches the best found, which no more rows can beat.

    Raises:
        ValueError: a sample longer than ``width``.
    """
    if not lengths:
        return []
    longest, total = max(lengths), sum(lengths)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a {longest}-token sample does not fit a packed row of {width} tokens")
    best: tuple[tuple[int, int], list[list[int]]] = ((len(lengths) * longest, longest), [[i] for i in
                                                                                      range(len(lengths))])
    for num_rows in range(-(-total // width), len(lengths)):
        if num_rows * longest > best[0][0]:
            break
        rows = pack_rows(lengths, num_rows)
        fullest = max(sum(lengths[i] for i in row) for row in rows)
        key = (num_rows * fullest, fullest)
        if fullest <= width and key < best[0]:
            best = (key, rows)
    return best[1]


def pack(ids: Sequence[np.ndarray | Sequence[int]], labels: Sequence[np.ndarray | Sequence[int]], pad_id: int,
         width: int | None = None) -> dict[str, Any]:
    """A packed loss batch of samples ``ids[i]`` / ``labels[i]`` (see the module docstring): rows of at most
    ``width`` tokens (default: the longest sample; the DataModule passes ``pack_width``), laid out by
    ``packed_rows``; the batch is as wide as its fullest row.

    Returns ``input_ids``, ``labels``, ``position_ids`` and ``attention_mask``, each (R, W), ``num_samples`` and
    ``packed_segments`` (per row, its samples' lengths; the tail counted with the last, as its positions say).
    Every sample's first label is IGNORE_INDEX: in its row it would be predicted from the previous sample's last
    token (a padded batch never uses position 0's label either, so the loss is the same). The row's tail after its last sample is
    ``pad_id`` with IGNORE_INDEX labels and mask 0; its positions continue the last sample's, so the tail joins
    that sample's block (only the tail attends to it) and every 0 in ``position_ids`` is a sample start.

    Raises:
        ValueError: no samples, a sample whose ids and labels differ in length, or one longer than ``width``.
    """
    if not ids:
        raise ValueError("pack needs at least one sample")
    arrays = [np.asarray(x, dtype=np.int64) for x in ids]
    targets = [np.asarray(y, dtype=np.int64) for y in labels]
    for i, (x, y) in enumerate(zip(arrays, targets, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"sample {i} of the batch: {x.shape[0]} ids but {y.shape[0]} labels")
    lengths = [len(x) for x in arrays]
    rows = packed_rows(lengths, width)
    width = max(sum(lengths[i] for i in row) for row in rows)  # (R, W): W is the fullest row
    out_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (R, W)
    out_labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    segments = []
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = len(arrays[i])
            out_ids[r, col: col + n] = arrays[i]
            out_labels[r, col: col + n] = targets[i]
            out_labels[r, col] = IGNORE_INDEX
            positions[r, col: col + n] = np.arange(n)
            mask[r, col: col + n] = 1
            col += n
        positions[r, col:] = np.arange(n, n + width - col)  # the tail continues the last sample
        segments.append((*(lengths[i] for i in members[:-1]), lengths[members[-1]] + width - col))
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels),
            "position_ids": torch.from_numpy(positions), "attention_mask": torch.from_numpy(mask),
            "num_samples": len(arrays), "packed_segments": tuple(segments)}
