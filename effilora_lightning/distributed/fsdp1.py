"""FSDP1 (Lightning's FSDPStrategy, ``use_orig_params=True``) for adapted models: the wrap policy, rank-0
loading, the root wrapper kept for evaluation after fit, global-norm clipping and the gather for export.

The LightningModule calls the functions at the bottom (``configure_fsdp1``, ``fsdp1_root``,
``reuse_fsdp1_root``, ``clip_fsdp1_grad_norm``) from its hooks; each is a no-op unless FSDP1 runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .fsdp2 import decoder_layers

__all__ = [
    "can_load_on_rank0", "clip_fsdp1_grad_norm", "configure_fsdp1", "fsdp1_rank0_load_kwargs", "fsdp1_root",
    "fsdp1_strategy", "fsdp1_wrap_policy", "gathered_for_export", "reuse_fsdp1_root",
]


def fsdp1_wrap_policy(model: nn.Module, extra_units: list[nn.Module] | None = None) -> Callable[..., bool]:
    """An ``auto_wrap_policy`` for FSDP1 (FSDPStrategy, ``use_orig_params=True``) that keeps adapters apart.

    Units, inner first: every frozen leaf module (projections, norms, embeddings, head: see ``_frozen_leaf``),
    then every block (decoder layers and ``extra_units``), then the root, which FSDP always wraps. A block's own
    unit is then left with its adapter weights only (B, routers), the root with the shared EffiLoRA A (and
    Lily's HP/LP) and any parameters tied between modules. Why: FSDP1 flattens a unit into ONE tensor, so a
    unit must hold a single dtype (a bf16 base beside fp32 adapters would not flatten), and its gradient is as
    large as the whole unit (frozen weights in an adapter unit would cost their full gradient memory).
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = [*(extra_units or []), *decoder_layers(model)]
    tied = _tied_params(model)
    units = {id(block) for block in blocks}
    units.update(id(m) for m in model.modules() if _frozen_leaf(m, tied))
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in units)


def _frozen_leaf(module: nn.Module, tied: set[int]) -> bool:
    """A module FSDP1 can give a unit of its own: no children, parameters of its own, all frozen, none tied to
    another module, and called (FSDP1 gathers a unit in its forward). MultiheadAttention reads its out_proj's
    weight without calling it; that Linear subclass stays with its parent."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    own = list(module.parameters(recurse=False))
    return (
        bool(own) and next(module.children(), None) is None and not any(p.requires_grad for p in own)
        and not any(id(p) in tied for p in own) and not isinstance(module, NonDynamicallyQuantizableLinear)
    )


def _tied_params(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied input and output embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def fsdp1_rank0_load_kwargs(device: torch.device) -> dict[str, Any]:
    """FSDP1 arguments for a model that only rank 0 built with real weights (the others on the meta device):
    each meta module gets empty storage on ``device`` and ``sync_module_states`` broadcasts rank 0's parameters
    and buffers (rotary ``inv_freq`` included) unit by unit. One copy of the checkpoint in host RAM, not N."""
    return {"sync_module_states": True, "param_init_fn": functools.partial(_empty_on, device=device)}


def _empty_on(module: nn.Module, device: torch.device) -> None:
    """FSDP calls this for every module below a unit, torchmetrics' too: touch only those holding meta tensors."""
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in own):
        module.to_empty(device=device, recurse=False)


def gathered_for_export(root: nn.Module) -> contextlib.AbstractContextManager:
    """Full parameters on rank 0 while an adapter is written, under FSDP1 (``root``: Lightning's
    ``trainer.strategy.model``). Outside forward FSDP1 leaves each rank a flat slice of every parameter;
    ``summon_full_params`` all-gathers them (offloaded to CPU, rank 0 only: the one that writes). Collective:
    every rank must enter. FSDP2 (DTensor, gathered by the writers themselves) and unsharded models need nothing.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    if not isinstance(root, FullyShardedDataParallel):
        return contextlib.nullcontext()
    if root.sharding_strategy == ShardingStrategy.NO_SHARD:  # what FSDP1 runs at world size 1: nothing to gather,
        # and summon_full_params refuses offload_to_cpu there ("not supported yet")
        return FullyShardedDataParallel.summon_full_params(root, writeback=False)
    return FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=True)


def fsdp1_strategy(trainer: Any) -> Any:
    """The trainer's FSDPStrategy, or None (no trainer, or another strategy)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy if trainer is not None else None
    return strategy if isinstance(strategy, FSDPStrategy) else None


def can_load_on_rank0(strategy: Any, model_path: str | None) -> bool:
    """Rank 0 alone reads the checkpoint when there is one, several ranks, and the user set neither
    ``sync_module_states=False`` nor a ``param_init_fn`` of their own (then every rank loads it, as before)."""
    kwargs = strategy.kwargs
    return (model_path is not None and strategy.world_size > 1 and kwargs.get("sync_module_states", True) is not False
            and kwargs.get("param_init_fn") is None)


def configure_fsdp1(strategy: Any, model: nn.Module, extra_units: list[nn.Module], rank0_load: bool,
                    info: Callable[[str], None] = print) -> None:
    """FSDP1 arguments the user left open: our wrap policy (``fsdp1_wrap_policy``: frozen leaves, blocks, root)
    instead of Lightning's one unit for the whole model; and with ``rank0_load`` (only rank 0 read the
    checkpoint, the others built on the meta device) ``sync_module_states`` to broadcast rank 0's weights into
    every rank's shards, after ``param_init_fn`` gave the meta modules empty storage."""
    if strategy.kwargs.get("auto_wrap_policy") is None:
        strategy.kwargs["auto_wrap_policy"] = fsdp1_wrap_policy(model, extra_units)
        info("FSDPStrategy: no auto_wrap_policy given; using effilora_lightning's fsdp1_wrap_policy "
             "(frozen leaves, then blocks, then the root, each its own unit).")
    if rank0_load:
        strategy.kwargs.update(fsdp1_rank0_load_kwargs(strategy.root_device))


def fsdp1_root(trainer: Any) -> Any:
    """At fit start: the root FullyShardedDataParallel wrapper Lightning built, or None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = trainer.strategy.model
    return root if isinstance(root, FullyShardedDataParallel) else None


def reuse_fsdp1_root(trainer: Any, module: nn.Module, root: Any) -> None:
    """``trainer.test`` (``test_after_fit``) after an FSDP1 fit in the same process: Lightning finds the
    decoder-layer units from the fit, takes the model for manually wrapped and leaves it without a root
    wrapper, so the root's parameters (embeddings, head, shared A) would stay flat shards and the first
    forward fails. Hand Lightning the root wrapper of the fit back: steps then run through it, as in fit."""
    if root is not None and fsdp1_strategy(trainer) is not None and trainer.strategy.model is module:
        trainer.strategy.model = root


def clip_fsdp1_grad_norm(root: Any, max_norm: float | None, algorithm: str | None) -> bool:
    """Clip by the GLOBAL norm under FSDP1 (the root's ``clip_grad_norm_`` all-reduces it); returns whether it
    did. Lightning's FSDP precision plugin refuses norm clipping, and a rank clipping its shard by its shard's
    norm would clip each rank differently."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if max_norm and algorithm in (None, "norm") and isinstance(root, FullyShardedDataParallel):
        root.clip_grad_norm_(max_norm)
        return True
    return False
