"""EffiLoRA: one low-rank A shared by every layer, per-layer B, optional B heads mixed by a router.

                       model root
                  effilora_shared_a.<group>   A_g (r x d_in, Kaiming)   one owner, one state-dict key
                           │  (read at forward time through an unregistered reference)
        ┌──────────────────┼──────────────────┐
    layer 0             layer 1      ...   layer L-1
    B_0 (d_out x r)     B_1                 B_{L-1}        zeros, each its own Parameter

    y = W0 x + (alpha/r) * sum_i softmax(R x)_i * B_{l,i} (A_g dropout(x))      (R only when heads > 1)

Groups (``share_a_by``): ``"target"`` gives one A per module type (all q_proj share one);
``"in_features"`` one A per input width, and then modules reading the same input in a layer
(q, k, v; gate, up) compute A x once.

Parameter count: |A| = r * sum_g d_in(g); |B| = L * N * r * sum_m d_out(m); |R| = L * N * sum_m d_in(m)
if N > 1. LLaMA-3-8B, q,k,v,up,down, r = 16, N = 1: 13,074,432 (one A per target).

The selection (``effilora_lightning.selection``, driven by EffiLoRACallback) decides which B train each
optimizer step. It reaches the B only through ``EffiLoRALinear.b_params()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLinear, kaiming_, mix_heads, new_param, resolve_dtype
from .method import AdapterMethod, Built, register_method

__all__ = ["EFFILORA", "EffiLoRAConfig", "EffiLoRALinear", "EffiLoRASharedA", "SHARED_A_NAME", "build"]

SHARED_A_NAME = "effilora_shared_a"
"""Attribute on the model root that owns every shared A (state-dict keys ``effilora_shared_a.<group>``)."""


@dataclass
class EffiLoRAConfig(AdapterConfig):
    """EffiLoRA: shared A, per-layer B. Which B train each step is the callback's business."""

    method: ClassVar[str] = "effilora"

    rank: int = 16
    alpha: float = 32.0
    """The update is multiplied by alpha / rank, as in LoRA (so exports to PEFT LoRA are exact)."""
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    share_a_by: Literal["target", "in_features"] = "target"
    """One A per module type (``target``), or one per input width (``in_features``)."""
    num_heads: int = 1
    """B heads per module; > 1 adds a token-wise softmax router (then no static merge exists)."""
    reuse_projection: bool = True
    """With share_a_by="in_features", compute A x once for modules that read the same tensor."""
    detach_frozen: bool = False
    """A layer whose B is frozen this step (EffiLoRACallback, ``freeze_mode="requires_grad"``) adds its low-rank
    update as a constant: no backward through its adapter path, so the shared A learns from the selected
    layers only (~0.5x LoRA's adapter FLOPs at keep 0.5, against ~0.7x with the default). Opt-in: BENCHMARKS.md
    measures what it costs in accuracy."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads < 1:
            raise ValueError(f"EffiLoRAConfig.num_heads must be >= 1, got {self.num_heads}.")
        self._check_dropout()


class EffiLoRASharedA(nn.ParameterDict):
    """Owner of the shared A matrices, one per group, registered once at the model root.

    It also carries a tiny per-parent cache so that q, k and v (same input, same A group) compute
    A x once. Parents clear the cache on entry and exit (hooks installed by ``apply_adapter``), so a
    re-run of the parent (activation checkpointing) recomputes instead of reusing a stale tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reuse_projection = False
        self._cache: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def project(self, x: torch.Tensor, group: str, dropout: nn.Module) -> torch.Tensor:
        """h = A_group dropout(x): (..., d_in) -> (..., r), shared between siblings when enabled."""
        key = (group, torch.is_grad_enabled())  # a detached sibling's h must never feed one that trains A
        if self.reuse_projection and not torch.compiler.is_compiling():
            hit = self._cache.get(key)
            if hit is not None and hit[0] is x:
                return hit[1]
        a = self[group]
        h = F.linear(dropout(x).to(a.dtype), a)  # (..., r)
        if self.reuse_projection:
            self._cache[key] = (x, h)
        return h

    def clear_cache(self, *_: object) -> None:
        self._cache.clear()


class EffiLoRALinear(AdapterLinear):
    """One wrapped Linear of one layer: its B head(s) and, with several heads, its router."""

    method: ClassVar[str] = "effilora"

    def __init__(
        self,
        base_layer: nn.Linear,
        cfg: EffiLoRAConfig,
        shared: EffiLoRASharedA,
        group: str,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__(base_layer, cfg.dropout)
        w = base_layer.weight
        dtype = resolve_dtype(cfg.adapter_dtype, w.dtype)
        self.group = group
        self.num_heads = cfg.num_heads
        self.rank = cfg.rank
        self.scaling = cfg.alpha / cfg.rank
        self.detach_frozen = cfg.detach_frozen
        # Unregistered: A has exactly one owner (the root); a registered alias would be saved per layer
        # and would put one parameter in two FSDP2 groups.
        object.__setattr__(self, "_shared", shared)
        self.effilora_B = nn.ParameterList(
            [nn.init.zeros_(new_param((self.out_features, cfg.rank), w, dtype)) for _ in range(cfg.num_heads)]
        )  # N x (d_out, r)
        if cfg.num_heads > 1:
            self.effilora_router = nn.Linear(self.in_features, cfg.num_heads, bias=False, device=w.device, dtype=dtype)
            kaiming_(self.effilora_router.weight, generator)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        with self._detached():
            h = self._shared.project(x, self.group, self.dropout)  # (..., r)
            if self.num_heads == 1:
                return F.linear(h, self.effilora_B[0]) * self.scaling  # (..., d_out)
            return mix_heads(x, h, self.effilora_router.weight, self.effilora_B) * self.scaling

    def low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.num_heads > 1:
            return None  # routed mixture of heads: not one product
        with self._detached():
            return self._shared.project(x, self.group, self.dropout), self.effilora_B[0]  # (..., r), (d_out, r)

    def _detached(self) -> contextlib.AbstractContextManager:
        """No autograd for this layer's adapter path while its B is frozen (``detach_frozen``), else nothing."""
        frozen = self.detach_frozen and not self.effilora_B[0].requires_grad
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def delta_weight(self) -> torch.Tensor:
        if self.num_heads > 1:
            return super().delta_weight()
        a = self._shared[self.group]
        return (self.effilora_B[0].float() @ a.float()) * self.scaling  # (d_out, d_in)

    def shared_a(self) -> torch.Tensor:
        """The A this layer reads (owned by the model root)."""
        return self._shared[self.group]

    def b_params(self) -> list[nn.Parameter]:
        return list(self.effilora_B)


def group_name(cfg: EffiLoRAConfig, module_name: str, layer: nn.Linear) -> str:
    """Group key for the shared A of ``module_name`` (a valid ParameterDict key)."""
    if cfg.share_a_by == "in_features":
        return f"in{layer.in_features}"
    return module_name.rsplit(".", 1)[-1]


def make_shared(cfg: EffiLoRAConfig, layers: dict[str, nn.Linear], generator: torch.Generator | None) -> EffiLoRASharedA:
    """Create one A per group; every module of a group must have the same input width."""
    shared = EffiLoRASharedA()
    shared.reuse_projection = cfg.reuse_projection and cfg.share_a_by == "in_features"
    widths: dict[str, tuple[int, str]] = {}
    for name, layer in layers.items():
        g = group_name(cfg, name, layer)
        seen = widths.setdefault(g, (layer.in_features, name))
        if seen[0] != layer.in_features:
            raise ValueError(
                f"EffiLoRA cannot share one A across '{seen[1]}' (d_in={seen[0]}) and '{name}' "
                f"(d_in={layer.in_features}): they have the same name but different input widths. "
                "Use share_a_by='in_features' or narrow target_modules."
            )
        if g not in shared:
            w = layer.weight
            a = new_param((cfg.rank, layer.in_features), w, resolve_dtype(cfg.adapter_dtype, w.dtype))
            kaiming_(a, generator)
            shared[g] = a  # (r, d_in)
    return shared


def build(cfg: EffiLoRAConfig, model: nn.Module, layers: dict[str, nn.Linear], gen: torch.Generator) -> Built:
    """One shared A per group at the root, one EffiLoRALinear per matched Linear. With ``reuse_projection`` the
    parents of the wrapped modules clear the A x cache on entry and exit (siblings share A x within one call)."""
    shared = make_shared(cfg, layers, gen)
    wrapped: dict[str, AdapterLinear] = {
        n: EffiLoRALinear(x, cfg, shared, group_name(cfg, n, x), gen) for n, x in layers.items()
    }
    if shared.reuse_projection:
        for parent in {n.rsplit(".", 1)[0] for n in layers if "." in n}:
            module = model.get_submodule(parent)
            module.register_forward_pre_hook(shared.clear_cache)
            module.register_forward_hook(shared.clear_cache)
    return {SHARED_A_NAME: shared}, wrapped, {"shared_a_groups": sorted(shared.keys())}


EFFILORA = register_method(AdapterMethod(
    name="effilora", config=EffiLoRAConfig, layer=EffiLoRALinear, build=build,
    groups={"effilora_shared_a": "shared_a", "effilora_B": "b", "effilora_router": "router"},
    merges=lambda cfg: cfg.num_heads == 1, is_lora=lambda cfg: cfg.num_heads == 1,
    lora_factors=lambda m: (m.shared_a(), m.effilora_B[0]),
))
