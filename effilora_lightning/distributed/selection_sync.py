"""What the strategy means for the selection (EffiLoRACallback) and its monitor: reduce ops and refusals.

    shards_flat_parameters(strategy)   FSDP1 with sharding: each rank's parameters are flat slices
    shards_adapters(strategy, units)   ranks hold different parts of each B (FSDP2 DTensors, or the above)
    score_reducer(strategy, units)     the all-reduce that completes per-unit scores: SUM over shards, MEAN
                                       over replicas (DDP), nothing in one process
    refuse_compile_and_plain_ddp(...)  freeze_mode="requires_grad" cannot run under torch.compile or under DDP
                                       without find_unused_parameters (see PITFALLS.md)

Private torch/Lightning names are read through ``private.py`` only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..selection.units import SelectableUnits
from .private import ddp_finds_unused_parameters, is_compiled

__all__ = ["refuse_compile_and_plain_ddp", "score_reducer", "shards_adapters", "shards_flat_parameters"]


def shards_flat_parameters(strategy: Any) -> bool:
    """Whether each rank holds a flat slice of the parameters: FSDP1 with any sharding but NO_SHARD (its
    ``use_orig_params`` views count local elements only, so totals need a SUM over ranks)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    return isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy != ShardingStrategy.NO_SHARD


def shards_adapters(strategy: Any, units: SelectableUnits) -> bool:
    """Whether each rank holds a different part of the B: FSDP2 (DTensor parameters) or sharded FSDP1. Under
    hybrid sharding the SUM counts each shard once per replica group: a uniform factor, which neither top-k nor
    the z-scored sampling sees."""
    return hasattr(units.params[0], "to_local") or shards_flat_parameters(strategy)


def all_reduce_scores(scores: torch.Tensor, sharded: bool) -> None:
    """Shards hold parts of each B (SUM completes the score); replicas hold copies (the mean keeps it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
        if not sharded:
            scores.div_(dist.get_world_size())


def score_reducer(strategy: Any, units: SelectableUnits) -> Callable[[torch.Tensor], None]:
    """The in-place all-reduce ``Reducer.end_step`` completes its per-unit scores with under ``strategy``."""
    return functools.partial(all_reduce_scores, sharded=shards_adapters(strategy, units))


def refuse_compile_and_plain_ddp(trainer: Any, pl_module: torch.nn.Module) -> None:
    """Raise when toggling requires_grad would silently go wrong: under torch.compile (graphs do not guard on
    it) or under DDP without find_unused_parameters (its reducer waits for the frozen B's gradients)."""
    if is_compiled(pl_module):
        raise RuntimeError(
            "EffiLoRACallback(freeze_mode='requires_grad') cannot run under torch.compile: compiled graphs do not "
            "guard on requires_grad, so toggled B would silently stop training. Use freeze_mode='grad_drop'."
        )
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not ddp_finds_unused_parameters(strategy):
        raise RuntimeError(
            "EffiLoRACallback(freeze_mode='requires_grad') under DDP needs find_unused_parameters: use "
            "strategy='ddp_find_unused_parameters_true', or freeze_mode='grad_drop'."
        )
