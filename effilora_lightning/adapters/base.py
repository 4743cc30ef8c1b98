"""What every adapter method shares: the config base class and the wrapped-Linear base class.

Pure PyTorch. A method file (lora.py, effilora.py, hydralora.py, lily.py) subclasses both:

    AdapterConfig   -> LoRAConfig, EffiLoRAConfig, ...     (what to build; YAML round-trips it)
    AdapterLinear   -> LoRALinear, EffiLoRALinear, ...     (wraps one frozen nn.Linear)

The wrapper holds the original layer as ``base_layer`` (composition, as PEFT and litgpt do), so the
frozen weight's state-dict key becomes ``<module>.base_layer.weight`` exactly as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.names import unwrapped_name
from ..distributed.private import has_forward_hooks, is_view

__all__ = ["AdapterConfig", "AdapterLinear", "layer_index", "resolve_dtype", "unwrapped_name"]

_INT = re.compile(r"^\d+$")


def layer_index(name: str) -> int | None:
    """The layer index of a module: the first integer component of its dotted name."""
    for part in name.split("."):
        if _INT.match(part):
            return int(part)
    return None


def resolve_dtype(adapter_dtype: str, base_dtype: torch.dtype) -> torch.dtype:
    """``"float32"`` keeps adapters in fp32 over a bf16/fp16 base (default); ``"base"`` follows the base."""
    if adapter_dtype == "base":
        return base_dtype
    return getattr(torch, adapter_dtype)


_DTYPES = ("float32", "bfloat16", "float16", "base")


@dataclass
class AdapterConfig:
    """Fields shared by every method. Subclasses add their own and call ``super().__post_init__()``."""

    method: ClassVar[str] = "base"

    rank: int = 8
    """Rank r of the low-rank update. Must not exceed min(d_in, d_out) of any wrapped layer."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """PEFT semantics: a list matches exact names or dotted suffixes; a string is a regex full match;
    ``"all-linear"`` is every Linear but the LM head (and never a vision tower or projector)."""
    exclude_modules: list[str] | str | None = None
    """Same matching rules as ``target_modules``; matched modules are left alone."""
    layers_to_transform: list[int] | int | None = None
    """Only wrap modules whose layer index (first integer in the dotted name) is listed."""
    exclude_vision: bool = True
    """Never wrap modules inside a vision tower or multimodal projector (by name)."""
    adapter_dtype: str = "float32"
    """Adapter weights' dtype: fp32 over a low-precision base by default, or ``"base"`` to follow it."""
    seed: int = 0
    """Seeds adapter init, so every rank of a distributed run builds identical adapters."""

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.rank <= 0:
            raise ValueError(f"{type(self).__name__}.rank must be a positive integer, got {self.rank}.")
        if self.adapter_dtype not in _DTYPES:
            raise ValueError(f"{type(self).__name__}.adapter_dtype must be one of {_DTYPES}, got {self.adapter_dtype!r}.")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError(f"{type(self).__name__}.target_modules is empty: name at least one module, e.g. ['q_proj'].")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def _check_dropout(self) -> None:
        """Shared by every method with a ``dropout`` field."""
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the method name, for adapter_config.json."""
        return {"method": self.method, **dataclasses.asdict(self)}


def _check_field_types(cfg: Any) -> None:
    """Reject a field of the wrong type with a message naming the field (YAML typos land here)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise TypeError(
                f"{type(cfg).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})."
            )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:  # ints are fine where floats are expected, bools are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """'int', 'list[str] | str | None', "one of ('target', 'in_features')"."""
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {typing.get_args(hint)}"
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


class AdapterLinear(nn.Module):
    """Base wrapper around a frozen ``nn.Linear``: y = base_layer(x) + delta(x).

    Subclasses implement ``delta`` (the adapter's contribution, in the adapter dtype) and, where the
    update is static, ``delta_weight`` (so that merge/unmerge work).
    """

    method: ClassVar[str] = "base"

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in) static update. Methods with input-dependent routing cannot provide one."""
        raise ValueError(
            f"{type(self).__name__} cannot be merged: its update depends on the input through a router, "
            "so no single weight matrix equals it. Keep the adapter unmerged for inference."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        factors = self.low_rank(x)
        if factors is None:
            return out + self.delta(x).to(out.dtype)
        h, b = factors  # (..., r), (d_out, r)
        if not self._can_add_in_place(out, b):  # e.g. a bf16 base with fp32 adapters: h is computed already
            return out + (F.linear(h, b) * self.scaling).to(out.dtype)
        if out.dim() == 2:
            return out.addmm_(h, b.t(), alpha=self.scaling)
        return out.baddbmm_(h, b.t().expand(out.shape[0], -1, -1), alpha=self.scaling)  # (B, T, d_out)

    def low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h, B) when ``delta(x) == scaling * h @ B^T``, so ``forward`` can add it into the base output in
        place; None for updates of another form (routers, Lily's mixtures)."""
        return None

    def _can_add_in_place(self, out: torch.Tensor, b: torch.Tensor) -> bool:
        """In place is exact and safe on the fresh output of a plain ``nn.Linear``: its backward saves the
        input and the weight, never the output. One fused GEMM then replaces B h, the scaling and the sum,
        and their (..., d_out) temporaries (measured in BENCHMARKS.md)."""
        return (
            type(self.base_layer) is nn.Linear
            and not has_forward_hooks(self.base_layer)
            and not is_view(out)
            and out.dtype == b.dtype
            and out.dim() in (2, 3)
        )

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += delta_weight, computed in fp32 and cast back. Idempotent."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= delta_weight. Idempotent; exact in fp32, rounding-limited in bf16."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def new_param(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised parameter on ``like``'s device (meta stays meta, so 8B shapes cost nothing)."""
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=dtype))


def kaiming_(param: torch.Tensor, generator: torch.Generator | None) -> None:
    """Kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA's A; seeded so all ranks agree."""
    if param.device.type == "meta":
        return
    with torch.no_grad():
        if param.device.type == "cpu":
            nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
        else:  # draw on CPU with the seeded generator, then copy: same values on any device
            tmp = torch.empty(param.shape, dtype=param.dtype)
            nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
            param.copy_(tmp)


def mix_heads(x: torch.Tensor, h: torch.Tensor, router: torch.Tensor, heads: nn.ParameterList) -> torch.Tensor:
    """Token-wise mixture sum_i softmax(R x)_i B_i h as ONE matmul: [B_1 .. B_N] @ (w (x) h).

    x: (..., d_in); h: (..., r); router: (N, d_in); heads: N x (d_out, r). Routing runs in fp32.
    """
    w = torch.softmax(F.linear(x.float(), router.float()), dim=-1)  # (..., N)
    hw = (w.unsqueeze(-1) * h.float().unsqueeze(-2)).flatten(-2).to(h.dtype)  # (..., N*r)
    return F.linear(hw, torch.cat(tuple(heads), dim=1))  # (..., d_out)
