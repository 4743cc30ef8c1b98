"""FSDP2 (``fully_shard``) for adapted Hugging Face models, as ModelParallelStrategy expects it, and the
FSDP1 wrap policy for FSDPStrategy.

Order matters (PITFALLS.md): adapters are injected first, then every decoder layer becomes its own FSDP
group, then the root. The shared EffiLoRA A (and Lily's HP/LP) live at the root, so each is managed by
exactly one group (the root's) and is all-gathered once per forward, before any layer reads it.

Mixed precision: parameters are all-gathered in ``param_dtype`` (bf16 on GPU) and gradients are reduced in
fp32; the sharded master copies keep their own dtype (fp32 adapters stay fp32).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "decoder_layers", "fsdp1_rank0_load_kwargs", "fsdp1_wrap_policy", "gathered_for_export", "materialize_from_rank0",
    "root_unsharded", "shard_model",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face LM (classes named ``*DecoderLayer``), in order."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(
            f"No '*DecoderLayer' modules in {type(model).__name__}: cannot choose FSDP units. "
            "Shard this model yourself in configure_model (fully_shard each block, then the root)."
        )
    return layers


def shard_model(
    model: nn.Module,
    mesh: object,
    param_dtype: str | None = None,
    reduce_dtype: str = "float32",
    extra_units: list[nn.Module] | None = None,
) -> nn.Module:
    """``fully_shard`` each decoder layer (and ``extra_units``, e.g. vision blocks), then the root.

    Args:
        model: the adapted model (adapters already injected).
        mesh: the data-parallel device mesh (``self.device_mesh["data_parallel"]`` in a LightningModule).
        param_dtype: dtype parameters are all-gathered and computed in (None: keep their own).
        reduce_dtype: dtype of gradient reduce-scatter (fp32 keeps adapter gradients exact).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[param_dtype] if param_dtype else None, reduce_dtype=_DTYPES[reduce_dtype]
    )
    for block in [*(extra_units or []), *decoder_layers(model)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root owns embeddings, head, shared A
    return model


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


@contextlib.contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """The FSDP2 root group's parameters gathered for code that reaches into the model without calling it.

    FSDP2 all-gathers a group around its module's ``__call__``. The root group (embeddings, head, shared A,
    projector, the vision tower's stem) is thus gathered only inside ``model(...)``; LLaVA's generation calls
    ``model.embed`` and ``model.language_model.generate`` instead and would meet sharded DTensors. Inner groups
    (decoder layers, vision blocks) still gather themselves when called. A no-op for any other model.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def materialize_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a sharded model built on the meta device its real weights, read on rank 0 only.

    Every rank allocates just its shards (``to_empty``); rank 0 passes the full state dict (other ranks an
    empty one) and ``set_model_state_dict`` broadcasts it shard by shard. Non-persistent buffers (rotary
    ``inv_freq``) are not in any state dict: their modules are rebuilt from their config on ``device``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    _rebuild_non_persistent_buffers(model, device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state, options=options)


def _rebuild_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ValueError(
                f"{type(module).__name__} has non-persistent buffers {sorted(names)} and no config to rebuild them "
                "after meta-device init; load this model without sharded_init."
            )
        with torch.device(device):
            fresh = type(module)(config)
        for name in names:
            setattr(module, name, getattr(fresh, name))
