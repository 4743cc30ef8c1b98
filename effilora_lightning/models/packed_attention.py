"""``attn_implementation="sdpa_packed"``: PyTorch SDPA that attends each sample of a packed row on its own.

Hugging Face's ``sdpa`` keeps the samples of a packed row (``data.batch.pack``) apart with a block-diagonal mask
of the whole row: (R, 1, W, W) booleans, and SDPA then computes all W x W scores of the row and masks most of
them (on CPU, and on GPU where a mask rules out the flash kernel). This implementation runs causal SDPA once per
sample instead: no mask is built, each sample costs its own L^2, and rows can be as wide as the whole batch
(``pack_width``: batch size x cutoff puts every sample in one row, with no padding at all). FlashAttention-2's
variable-length kernel does the same in one call on GPUs that have it; this one works wherever SDPA does.

Where the samples start comes, in order of preference, from

* ``packed_segments``: per row, the lengths of its consecutive pieces (Python ints, ``data.batch.pack`` computes
  them on the host; ``CausalLMModule`` passes them to the model's forward), so a step has no host sync;
* ``position_ids`` (every other caller, e.g. a model packed by another collator): a sample starts wherever the
  position does not follow the previous one, as Hugging Face's own masking reads it; read to the host once per
  forward (the same tensor reaches every layer) and cached.

Everything else (a padding mask, generation with a cache, one query token) is Hugging Face's ``sdpa``, unchanged.
Importing ``effilora_lightning.models`` registers the implementation (attention and mask) with transformers.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_PACKED = "sdpa_packed"

Segments = Sequence[Sequence[int]]  # per row of the batch, the lengths of its pieces, in order; they sum to W

_cached: tuple[weakref.ref[torch.Tensor], int, tuple[tuple[int, ...], ...]] | None = None  # (ids, their version, segments)


def segments_from_positions(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Per row of ``position_ids`` (R, W), the lengths of its runs of consecutive positions: a piece starts
    wherever a position is not the previous one + 1 (Hugging Face's ``find_packed_sequence_indices`` rule).
    One host copy of the (R, W) ids; the last result is cached for the same tensor (every layer gets it)."""
    global _cached
    if _cached is not None and _cached[0]() is position_ids and _cached[1] == position_ids._version:
        return _cached[2]
    rows = []
    for row in position_ids.detach().cpu().numpy():  # (W,) each
        starts = np.flatnonzero(np.diff(row) != 1) + 1  # where a piece starts, after the first
        rows.append(tuple(np.diff(np.concatenate(([0], starts, [len(row)]))).tolist()))
    result = tuple(rows)
    _cached = (weakref.ref(position_ids), position_ids._version, result)
    return result


def _check_segments(segments: Segments, rows: int, width: int) -> None:
    if len(segments) != rows or any(sum(row) != width for row in segments):
        raise ValueError(
            f"packed_segments describe {len(segments)} rows of {[sum(r) for r in segments]} tokens, but the batch "
            f"has {rows} rows of {width}: pass the segments of this batch (data.batch.pack returns them).")


def _attend_by_segment(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                       dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """Causal SDPA over each piece of each row. query (R, H, W, D), key/value (R, H_kv, W, D) -> (R, W, H, D).

    Rows and pieces are split off (views whose backward is one cat), not sliced: a slice's backward writes its
    gradient into a zero tensor of the whole input, once per piece. Each piece stays 4-D (1, H, n, D): the fused
    CUDA kernels (flash, memory-efficient) take 4-D inputs only and would leave a 3-D one to the math kernel."""
    rows = []
    for q_row, k_row, v_row, lengths in zip(query.split(1), key.split(1), value.split(1), segments, strict=True):
        pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                 enable_gqa=gqa)  # (1, H, n, D)
                  for q, k, v in zip(q_row.split(lengths, dim=2), k_row.split(lengths, dim=2),
                                     v_row.split(lengths, dim=2))]
        rows.append(torch.cat(pieces, dim=2))  # (1, H, W, D)
    return torch.cat(rows).transpose(1, 2).contiguous()  # (R, W, H, D), as HF's attention functions return


def sdpa_packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_segments: Segments | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function (``AttentionInterface``); see the module docstring.

    query (R, H, W, D); key, value (R, H_kv, W, D) -> ((R, W, H, D), None)."""
    rows, _, width, _ = query.shape
    whole_rows = attention_mask is None and width > 1 and key.shape[2] == width  # no padding mask, no cache
    if whole_rows and (packed_segments is not None or kwargs.get("position_ids") is not None):
        if packed_segments is not None:
            segments = packed_segments
            _check_segments(segments, rows, width)
        else:
            segments = segments_from_positions(kwargs["position_ids"])
            segments = segments * rows if len(segments) == 1 < rows else segments  # (1, W) ids serve every row
        if any(len(row) > 1 for row in segments):
            gqa = key.shape[1] != query.shape[1]
            return _attend_by_segment(query, key, value, segments, dropout, scaling, gqa), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def sdpa_packed_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask ``sdpa_packed`` needs: Hugging Face's ``sdpa`` mask where there is a padding mask to honour, none
    otherwise (causal and the packed samples' boundaries are the attention function's; building the (R, 1, W, W)
    block mask is what this implementation exists to avoid)."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(SDPA_PACKED, sdpa_packed_attention)
AttentionMaskInterface.register(SDPA_PACKED, sdpa_packed_mask)
