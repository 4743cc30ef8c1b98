"""The optimizer a fine-tuning run gets: AdamW over every adapter parameter in named groups, each with its own
learning rate, and a step-wise warm-up then cosine / linear decay (or constant).

Which of torch's three AdamW implementations runs is chosen here, not left to torch, whose default for CPU
parameters (and any device without foreach kernels) is the for-loop one: a Python loop over every parameter on
every step. ``fused`` (the default here, and Hugging Face Trainer's for torch >= 2.8) updates all parameters in one
kernel per device and dtype: on CPU 2.9-3.3x faster than the for loop for the demo adapters and 3.0x for LLaMA-3-8B's
rank-16 LoRA (BENCHMARKS.md, "The optimizer step"); it rounds differently from the other two, by ~1e-9 on these
values. ``foreach`` does the for loop's arithmetic bit for bit in multi-tensor ops (tested), torch's own choice on
CUDA, but on CPU it is 2.3x slower than the for loop at 8B sizes; ``for_loop`` reproduces runs made before the
choice (2026-12-05) exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..adapters import is_adapter_param, param_group

__all__ = ["ADAMW_IMPLEMENTATIONS", "adamw", "adamw_with_schedule", "adapter_param_groups", "lr_factor",
           "resumed_implementation"]

ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for_loop")
"""The names ``adamw`` takes, torch's three implementations (module docstring)."""


def adapter_param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], learning_rate: float,
                         overrides: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Every adapter parameter (by name, frozen ones too) in its method's group (``param_group``), each group
    with ``overrides[group]`` as its learning rate, or ``learning_rate`` where that is None. ``is None``, not
    ``or``: an override of 0.0 freezes the group, it does not fall back."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in named:
        if is_adapter_param(name):
            groups.setdefault(param_group(name) or "b", []).append(p)
    return [{"name": g, "params": ps, "lr": learning_rate if overrides.get(g) is None else overrides[g]}
            for g, ps in groups.items()]


def adamw(params: Iterable[Any], learning_rate: float, weight_decay: float = 0.0,
          implementation: str = "fused") -> torch.optim.AdamW:
    """torch's AdamW over ``params`` (tensors or groups) with ``implementation`` (one of ``ADAMW_IMPLEMENTATIONS``)
    named explicitly, so that no device falls back to the per-parameter Python loop unasked."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"adamw_implementation must be one of {', '.join(ADAMW_IMPLEMENTATIONS)}, "
                         f"got {implementation!r}.")
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                             foreach=implementation == "foreach", fused=implementation == "fused")


def resumed_implementation(checkpoint: Mapping[str, Any], wanted: str) -> str | None:
    """What a resume from ``checkpoint`` will step with, where that is not ``wanted``: torch's
    ``Optimizer.load_state_dict`` restores the saved groups' ``foreach`` / ``fused`` flags with their state, so a
    resumed run continues with the implementation it was written by (exactly as it would have gone on). A
    description of it when it differs from ``wanted``; None when it is the same or the checkpoint holds no
    optimizer state (validate / test, or a sharded checkpoint whose strategy loads it)."""
    states = checkpoint.get("optimizer_states") or []
    groups = states[0].get("param_groups") if states and isinstance(states[0], Mapping) else None
    if not groups:
        return None
    group = groups[0]
    if group.get("fused"):
        saved = "fused"
    elif group.get("foreach"):
        saved = "foreach"
    elif group.get("foreach") is False:
        saved = "for_loop"
    else:  # both None: written before the modules named it (2026-12-05), torch's choice by device
        saved = "torch's default (the for loop on CPU, foreach on CUDA)"
    return None if saved == wanted else saved


def adamw_with_schedule(groups: list[dict[str, Any]], learning_rate: float, weight_decay: float, scheduler: str,
                        warmup_steps: int | float, min_lr_ratio: float, total_steps: float,
                        implementation: str = "fused") -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: AdamW (``adamw``) and a per-step LambdaLR (warm-up given in
    steps, or as a share of ``total_steps`` when a float)."""
    optimizer = adamw(groups, learning_rate, weight_decay, implementation)
    total = max(int(total_steps), 1)
    warmup = warmup_steps if isinstance(warmup_steps, int) else int(warmup_steps * total)
    schedule = LambdaLR(optimizer, lr_factor(scheduler, warmup, total, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """step -> multiplier of the base learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return factor
