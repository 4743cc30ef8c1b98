"""LoRA (Hu et al., 2021): one A and one B per wrapped Linear.

    x ──► W0 (frozen, d_out x d_in) ─────────────────────┐
    │                                                     (+) ──► y
    └─► dropout ─► A (r x d_in, Kaiming) ─► B (d_out x r, zeros) ─► * alpha/r ─┘

B starts at zero, so the adapted model equals the base model at step 0.
Parameters per wrapped module: r * (d_in + d_out). Merges into W0 as W0 + (alpha/r) B A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLinear, kaiming_, new_param, resolve_dtype
from .method import AdapterMethod, register_method

__all__ = ["LORA", "LoRAConfig", "LoRALinear"]


@dataclass
class LoRAConfig(AdapterConfig):
    """Plain LoRA, the baseline every other method is compared with."""

    method: ClassVar[str] = "lora"

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input only (the frozen path never sees it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_dropout()


class LoRALinear(AdapterLinear):
    """y = W0 x + (alpha/r) B A dropout(x)."""

    method: ClassVar[str] = "lora"

    def __init__(self, base_layer: nn.Linear, cfg: LoRAConfig, generator: torch.Generator | None) -> None:
        super().__init__(base_layer, cfg.dropout)
        w = base_layer.weight
        dtype = resolve_dtype(cfg.adapter_dtype, w.dtype)
        self.scaling = cfg.alpha / cfg.rank
        self.lora_A = new_param((cfg.rank, self.in_features), w, dtype)  # (r, d_in)
        self.lora_B = new_param((self.out_features, cfg.rank), w, dtype)  # (d_out, r)
        kaiming_(self.lora_A, generator)
        nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h, b = self.low_rank(x)
        return F.linear(h, b) * self.scaling  # (..., d_out)

    def low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B  # (..., r), (d_out, r)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (d_out, d_in)


LORA = register_method(AdapterMethod(
    name="lora", config=LoRAConfig, layer=LoRALinear, groups={"lora_A": "a", "lora_B": "b"},
    merges=lambda cfg: True, lora_factors=lambda m: (m.lora_A, m.lora_B), is_lora=lambda cfg: True,
))
