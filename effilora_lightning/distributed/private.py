"""Every read of a private (underscore) name of torch or Lightning, in one place, pinned to the versions it was
checked against.

Private names change without notice between releases. Each one this project needs is read here through a small
function, so an upgrade is checked in one file: ``tests/distributed/test_private.py`` exercises every function on
real objects (it fails loudly when a name moved) and refuses versions outside ``VERIFIED_WITH`` until someone
re-checks this file and extends the table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "VERIFIED_WITH", "attached_trainer", "device_mesh_of", "ddp_finds_unused_parameters", "fsdp1_state_dict_type",
    "has_forward_hooks", "is_compiled", "is_view", "non_persistent_buffer_names", "precision_compute_dtype",
    "saves_distributed_checkpoint",
]

VERIFIED_WITH: dict[str, tuple[str, ...]] = {"torch": ("2.11", "2.14"), "lightning": ("2.6",)}
"""Package -> the major.minor versions every function below was checked against (torch 2.11: the GPU image's,
checked 2026-12-06 on the CPU with torch 2.11.0 / transformers 5.17.0, tests/distributed/test_private.py passing)."""


# ------------------------------------------------------------------------------------------------ torch
def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on ``module`` itself (``nn.Module._forward_hooks``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_view(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view of another tensor's storage (``Tensor._base``)."""
    return tensor._base is not None


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s own buffers registered with ``persistent=False`` (never in a state dict)."""
    return set(getattr(module, "_non_persistent_buffers_set", ()))


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs through ``torch.compile``: Lightning's ``_compiler_ctx`` (``Trainer`` compiles) or
    ``nn.Module.compile()``'s ``_compiled_call_impl``."""
    return bool(getattr(module, "_compiler_ctx", None) or getattr(module, "_compiled_call_impl", None))


# ------------------------------------------------------------------------------------------------ Lightning
def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when detached)."""
    return getattr(module, "_trainer", None)


def device_mesh_of(module: Any) -> Any:
    """The device mesh ModelParallelStrategy gave a LightningModule (``_device_mesh``), or None."""
    return getattr(module, "_device_mesh", None)


def ddp_finds_unused_parameters(strategy: Any) -> bool:
    """A DDPStrategy's ``find_unused_parameters`` (kept in ``_ddp_kwargs``)."""
    return bool(strategy._ddp_kwargs.get("find_unused_parameters", False))


def fsdp1_state_dict_type(strategy: Any) -> str:
    """An FSDPStrategy's ``state_dict_type`` (``"full"`` or ``"sharded"``, kept in ``_state_dict_type``)."""
    return getattr(strategy, "_state_dict_type", "full")


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """A ModelParallelStrategy's ``save_distributed_checkpoint`` (kept in ``_save_distributed_checkpoint``)."""
    return bool(strategy._save_distributed_checkpoint)


def precision_compute_dtype(plugin: Any) -> torch.dtype:
    """The dtype matmuls run in under a precision plugin (bf16-mixed: bfloat16), as ThroughputMonitor reads it."""
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(plugin)
