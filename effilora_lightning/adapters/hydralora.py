"""HydraLoRA (Tian et al., NeurIPS 2024): per module one A, N B heads and a token-wise router.

    x ─► dropout ─► A (r x d_in, Kaiming) ─► h ─┬─► B_1 (d_out x r, zeros) ─┐
    │                                           ├─► ...                    ├─ sum_i w_i * ─► * alpha/r
    │                                           └─► B_N ───────────────────┘
    └─► R (N x d_in, Kaiming, no bias) ─► w = softmax(R x)  (token-wise, fp32)

Unlike EffiLoRA, A belongs to one module (shared only by that module's heads). The released code wraps
MLP modules only; ours wraps any target. Parameters per module: r d_in + N r d_out + N d_in.
No merge: the update depends on the input through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLinear, kaiming_, mix_heads, new_param, resolve_dtype
from .method import AdapterMethod, register_method

__all__ = ["HYDRALORA", "HydraLoRAConfig", "HydraLoRALinear"]


@dataclass
class HydraLoRAConfig(AdapterConfig):
    """HydraLoRA with the reference recipe's defaults (r = 4, alpha = 32, N = 4)."""

    method: ClassVar[str] = "hydralora"

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    num_heads: int = 4
    """Number of B heads per module, mixed by the token-wise router."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads < 1:
            raise ValueError(f"HydraLoRAConfig.num_heads must be >= 1, got {self.num_heads}.")
        self._check_dropout()


class HydraLoRALinear(AdapterLinear):
    """y = W0 x + (alpha/r) sum_i softmax(R x)_i B_i A dropout(x)."""

    method: ClassVar[str] = "hydralora"

    def __init__(self, base_layer: nn.Linear, cfg: HydraLoRAConfig, generator: torch.Generator | None) -> None:
        super().__init__(base_layer, cfg.dropout)
        w = base_layer.weight
        dtype = resolve_dtype(cfg.adapter_dtype, w.dtype)
        self.scaling = cfg.alpha / cfg.rank
        self.hydralora_A = new_param((cfg.rank, self.in_features), w, dtype)  # (r, d_in)
        kaiming_(self.hydralora_A, generator)
        self.hydralora_B = nn.ParameterList(
            [nn.init.zeros_(new_param((self.out_features, cfg.rank), w, dtype)) for _ in range(cfg.num_heads)]
        )  # N x (d_out, r)
        self.hydralora_router = nn.Linear(self.in_features, cfg.num_heads, bias=False, device=w.device, dtype=dtype)
        kaiming_(self.hydralora_router.weight, generator)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x).to(self.hydralora_A.dtype), self.hydralora_A)  # (..., r)
        return mix_heads(x, h, self.hydralora_router.weight, self.hydralora_B) * self.scaling  # (..., d_out)


HYDRALORA = register_method(AdapterMethod(
    name="hydralora", config=HydraLoRAConfig, layer=HydraLoRALinear,
    groups={"hydralora_A": "a", "hydralora_B": "b", "hydralora_router": "router"},
))
