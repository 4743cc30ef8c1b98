"""Lily (Zhong, Zhao, Zhou, arXiv 2407.09946): low-rank interconnected adaptation across layers.

Per module type m (e.g. all q_proj):

    LP_{k,m}  (r x d_in, Kaiming)    local A, shared by a block of L // num_a consecutive layers
    HP_m      (num_b, r, d_out), 0   global B experts, shared by ALL layers
    Router_l  (num_b x r, no bias)   one per (layer, module)

    h = LP x                                              (B, T, r)
    p = mean over batch and tokens of softmax(Router h)   (num_b,)   batch-level, not token-level
    y = W0 x + scale * h @ (sum_e p_e HP_m[e])

The reference averages over padding too (default here); ``masked_routing=True`` averages over real
tokens only, using the attention mask the model is called with. The reference applies no scale
(scale = 1). With L not divisible by num_a the reference's stride L // num_a creates extra LPs; so does
this code, and the AdapterReport says how many. Parameters per type: n_LP d_in r + num_b r d_out + L r num_b.
No merge: the update depends on the batch through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLinear, kaiming_, layer_index, new_param, resolve_dtype
from .method import AdapterMethod, Built, register_method

__all__ = ["LILY", "LILY_SHARED_NAME", "LilyConfig", "LilyLinear", "LilyShared", "build"]

LILY_SHARED_NAME = "lily_shared"


@dataclass
class LilyConfig(AdapterConfig):
    """Lily with the reference LLaMA-3-8B commonsense recipe's defaults (r = 16, 4 LPs, 4 HPs)."""

    method: ClassVar[str] = "lily"

    rank: int = 16
    num_a: int = 4
    """ne_1: number of local A (LP) blocks over the depth; each serves L // num_a consecutive layers."""
    num_b: int = 4
    """ne_2: number of global B experts (HP) per module type."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    masked_routing: bool = False
    """Average router probabilities over real tokens only (the reference averages over padding too)."""
    scale: float = 1.0
    """Multiplier of the update; the reference uses none (1.0)."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_a", "num_b"):
            if getattr(self, name) < 1:
                raise ValueError(f"LilyConfig.{name} must be >= 1, got {getattr(self, name)}.")
        self._check_dropout()


class LilyShared(nn.Module):
    """Owner (at the model root) of the HP experts and LP projections, and of the routing mask."""

    def __init__(self) -> None:
        super().__init__()
        self.lily_hp = nn.ParameterDict()  # type -> (num_b, r, d_out)
        self.lily_lp = nn.ParameterDict()  # f"{type}_{k}" -> (r, d_in)
        self.attention_mask: torch.Tensor | None = None

    def capture_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model root: remember the attention mask for masked routing."""
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None


class LilyLinear(AdapterLinear):
    """One (layer, module): reads its block's LP and its type's HP from the root; owns its router."""

    method: ClassVar[str] = "lily"

    def __init__(
        self, base_layer: nn.Linear, cfg: LilyConfig, shared: LilyShared, mtype: str, lp: str, gen: torch.Generator | None
    ) -> None:
        super().__init__(base_layer, cfg.dropout)
        w = base_layer.weight
        object.__setattr__(self, "_shared", shared)  # unregistered: HP and LP have one owner
        self.mtype, self.lp = mtype, lp
        self.scale = cfg.scale
        self.masked_routing = cfg.masked_routing
        self.lily_router = nn.Linear(
            cfg.rank, cfg.num_b, bias=False, device=w.device, dtype=resolve_dtype(cfg.adapter_dtype, w.dtype)
        )
        kaiming_(self.lily_router.weight, gen)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lp = self._shared.lily_lp[self.lp]
        hp = self._shared.lily_hp[self.mtype]  # (E, r, d_out)
        h = F.linear(self.dropout(x).to(lp.dtype), lp)  # (..., r)
        probs = torch.softmax(F.linear(h.float(), self.lily_router.weight.float()), dim=-1)  # (..., E)
        p = self._batch_mean(probs)  # (E,)
        combined = torch.einsum("e,erd->rd", p, hp.float()).to(h.dtype)  # (r, d_out)
        return (h @ combined) * self.scale  # (..., d_out)

    def _batch_mean(self, probs: torch.Tensor) -> torch.Tensor:
        mask = self._shared.attention_mask
        if self.masked_routing and mask is not None and mask.shape == probs.shape[:-1]:
            m = mask.to(probs.dtype).unsqueeze(-1)  # (B, T, 1)
            return (probs * m).sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
        return probs.reshape(-1, probs.shape[-1]).mean(dim=0)


def build(cfg: LilyConfig, model: nn.Module, layers: dict[str, nn.Linear], gen: torch.Generator | None) -> Built:
    """Wrap ``layers`` (name -> Linear): one LilyShared at the root owns every HP and LP; with masked routing a
    forward pre-hook on ``model`` hands it the attention mask. Returns (root modules, wrappers, report extras)."""
    shared = LilyShared()
    depth_of = {name: layer_index(name) for name in layers}
    by_type: dict[str, list[str]] = {}
    for name in layers:
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    wrapped: dict[str, AdapterLinear] = {}
    num_lp: dict[str, int] = {}
    for mtype, names in by_type.items():
        depth = sorted({depth_of[n] or 0 for n in names})
        stride = max(1, len(depth) // cfg.num_a)  # the reference's stride; extra LPs when L % num_a != 0
        first = layers[names[0]].weight
        dtype = resolve_dtype(cfg.adapter_dtype, first.dtype)
        shared.lily_hp[mtype] = nn.init.zeros_(new_param((cfg.num_b, cfg.rank, layers[names[0]].out_features), first, dtype))
        for name in names:
            k = depth.index(depth_of[name] or 0) // stride
            key = f"{mtype}_{k}"
            if key not in shared.lily_lp:
                shared.lily_lp[key] = new_param((cfg.rank, layers[name].in_features), first, dtype)
                kaiming_(shared.lily_lp[key], gen)
            wrapped[name] = LilyLinear(layers[name], cfg, shared, mtype, key, gen)
        num_lp[mtype] = len({w.lp for n, w in wrapped.items() if n in names})
    if cfg.masked_routing:
        model.register_forward_pre_hook(shared.capture_mask, with_kwargs=True)
    return {LILY_SHARED_NAME: shared}, wrapped, {"lily_num_lp": num_lp}


LILY = register_method(AdapterMethod(
    name="lily", config=LilyConfig, layer=LilyLinear, groups={"lily_lp": "shared_a", "lily_hp": "b", "lily_router": "router"},
    build=build,
))
