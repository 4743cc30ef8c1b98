"""Refusals, at start, of what a strategy cannot do with adapters, each naming the alternative."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .checkpointing import saves_full_shards
from .private import fsdp1_state_dict_type

__all__ = ["check_strategy"]


def check_strategy(strategy: Any, warn: Callable[[str], None]) -> None:
    """Raise for FSDP1 without ``use_orig_params`` or with sharded state dicts; warn for Lightning's
    ModelParallelStrategy writing sharded checkpoints (they must hold the whole model). Anything else passes."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", False):
        raise ValueError(
            "FSDPStrategy (FSDP1) with adapters needs use_orig_params=True (frozen base and trainable adapters "
            "share FSDP units). Set strategy.init_args.use_orig_params: true, or use ModelParallelStrategy "
            "(FSDP2, preferred)."
        )
    if isinstance(strategy, FSDPStrategy) and fsdp1_state_dict_type(strategy) == "sharded":
        raise ValueError(
            "FSDPStrategy (FSDP1) with state_dict_type='sharded' reloads every key of the model, and our checkpoints "
            "hold the adapter only, so such a run could not resume. Use state_dict_type='full' (one adapter-only "
            "file, written by rank 0), or effilora_lightning.AdapterModelParallelStrategy (FSDP2, sharded "
            "adapter-only checkpoints)."
        )
    if saves_full_shards(strategy):
        warn(
            "ModelParallelStrategy(save_distributed_checkpoint=True) can only resume from sharded checkpoints "
            "holding the whole model, so each checkpoint will also hold the frozen base weights. Use "
            "effilora_lightning.strategies.AdapterModelParallelStrategy (same arguments) for adapter-only ones."
        )
