"""``attn_implementation="sdpa_packed"``: PyTorch SDPA that attends each sample of a packed row on its own.

Hugging Face's ``sdpa`` keeps the samples of a packed row (``data.batch.pack``) apart with a block-diagonal mask
of the whole row: (R, 1, W, W) booleans, and SDPA then computes all W x W scores of the row and masks most of
them (on CPU, and on GPU where a mask rules out the flash kernel). This implementation runs causal SDPA once per
sample instead: no mask is built, each sample costs its own L^2, and rows can be as wide as the whole batch
(``pack_width``: batch size x cutoff puts every sample in one row, with no padding at all).

Two kernels do it:

* on CUDA (compute capability 8.0 or newer), fp16 / bf16 (e.g. under bf16 autocast), no attention dropout:
  ONE call of PyTorch's variable-length flash kernel (``torch.nn.attention.varlen.varlen_attn``) per layer for
  the whole batch, the samples given by their cumulative starts (one small host-to-device copy per forward).
  Its signature is read once (``varlen_style``) and it is called as the installed release takes it: 2.10's
  ``is_causal`` (no ``scale``), 2.11's ``scale`` and ``window_size`` (the GPU image's), and where there is no
  ``enable_gqa`` (2.10, 2.11) the KV heads repeated for GQA;
* everywhere else (CPU, fp32): causal SDPA once per sample, each piece a view of the row.

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

import functools
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # PyTorch's variable-length flash attention (CUDA only); absent from older releases
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - torch >= 2.10 has it
    _varlen_attn = None

SDPA_PACKED = "sdpa_packed"

Segments = Sequence[Sequence[int]]  # per row of the batch, the lengths of its pieces, in order; they sum to W

_cached: tuple[weakref.ref[torch.Tensor], int, tuple[tuple[int, ...], ...]] | None = None  # (ids, their version, segments)
_starts_cached: tuple[Segments, torch.device, torch.Tensor, int] | None = None  # (segments, device, starts, longest)


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


@functools.cache
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


class VarlenStyle(NamedTuple):
    """How this PyTorch's ``varlen_attn`` takes what sdpa_packed needs; its signature changed across releases
    (2.10: ``is_causal`` and no scale or GQA flag; 2.11: keyword-only ``scale`` and ``window_size``; 2.14 also
    ``enable_gqa``). ``causal``: the keyword arguments that make it causal."""

    causal: dict[str, Any]
    scale: bool
    gqa: bool


@functools.lru_cache(maxsize=4)
def varlen_style(fn: Callable[..., Any] | None) -> VarlenStyle | None:
    """``fn``'s ``VarlenStyle`` read off its signature (once per function), or None where it takes no causal
    mask this module knows (then the per-sample loop runs)."""
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}  # (-1, 0): everything before, nothing after
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return VarlenStyle(causal, "scale" in params, "enable_gqa" in params)


def varlen_kernel_applies(query: torch.Tensor, dropout: float, scaling: float | None = None) -> bool:
    """Whether one ``varlen_attn`` call can attend the batch: what PyTorch's flash kernel takes (CUDA, compute
    capability >= 8.0, fp16 / bf16, head dim a multiple of 8 up to 256), no dropout (it has none), and a
    ``scaling`` this PyTorch's ``varlen_attn`` can be given (one without ``scale`` only uses 1 / sqrt(D))."""
    style = varlen_style(_varlen_attn)
    head_dim = query.shape[-1]
    return (style is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and dropout == 0.0 and head_dim % 8 == 0 and head_dim <= 256
            and (style.scale or scaling is None or math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6))
            and _flash_capable(query.get_device()))


def cumulative_starts(segments: Segments, device: torch.device) -> tuple[torch.Tensor, int]:
    """Every piece's start in the flattened batch (rows one after another) and the end, (pieces + 1,) int32 on
    ``device``, and the longest piece: ``varlen_attn``'s ``cu_seq`` and ``max``. One host-to-device copy per
    forward: the last result is kept for the same segments (every layer gets the same ones)."""
    global _starts_cached
    if (_starts_cached is not None and _starts_cached[1] == device
            and (_starts_cached[0] is segments or _starts_cached[0] == segments)):
        return _starts_cached[2], _starts_cached[3]
    lengths = [n for row in segments for n in row]
    starts = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32).to(device, non_blocking=True)
    _starts_cached = (segments, device, starts, max(lengths))
    return starts, max(lengths)


def _attend_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                   scaling: float | None, gqa: bool) -> torch.Tensor:
    """Causal attention of every piece in one ``varlen_attn`` call. query (R, H, W, D), key/value (R, H_kv, W, D)
    -> (R, W, H, D). Hugging Face's query is a transposed (R, W, H, D) tensor, so the flattening is a view."""
    rows, heads, width, _ = query.shape
    starts, longest = cumulative_starts(segments, query.device)

    def tokens_first(x: torch.Tensor) -> torch.Tensor:  # (R, h, W, d) -> (R * W, h, d)
        return x.transpose(1, 2).reshape(rows * width, x.shape[1], x.shape[3])

    style = varlen_style(_varlen_attn)
    kwargs = dict(style.causal)
    if style.scale:
        kwargs["scale"] = scaling
    if gqa and style.gqa:
        kwargs["enable_gqa"] = True
    elif gqa:  # a release without the flag: every query head gets its KV head's copy, as repeat_kv does
        key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))
    out = _varlen_attn(tokens_first(query), tokens_first(key), tokens_first(value), starts, starts, longest,
                       longest, **kwargs)  # (R * W, H, D)
    return out.view(rows, width, heads, out.shape[-1])


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
            if varlen_kernel_applies(query, dropout, scaling):
                return _attend_varlen(query, key, value, segments, scaling, gqa), None
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
