"""FSDP2 (``fully_shard``) for adapted Hugging Face models, as ModelParallelStrategy expects it.

Order matters (PITFALLS.md): adapters are injected first, then every decoder layer becomes its own FSDP
group, then the root. The shared EffiLoRA A (and Lily's HP/LP) live at the root, so each is managed by
exactly one group (the root's) and is all-gathered once per forward, before any layer reads it.

Mixed precision: parameters are all-gathered in ``param_dtype`` (bf16 on GPU) and gradients are reduced in
fp32; the sharded master copies keep their own dtype (fp32 adapters stay fp32). Rank-0 loading: every rank
builds on the meta device and shards, rank 0 alone reads the checkpoint and ``materialize_from_rank0``
broadcasts it shard by shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .private import non_persistent_buffer_names

__all__ = ["decoder_layers", "materialize_from_rank0", "root_unsharded", "shard_model"]

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
        names = non_persistent_buffer_names(module)
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
