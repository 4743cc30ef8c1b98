"""Names and tensors as the unwrapped model has them, whatever wrapper a strategy put around it. Pure PyTorch.

FSDP1 (``use_orig_params=True``) inserts ``_fsdp_wrapped_module.`` levels into module and parameter names, and
activation checkpointing's wrapper ``_checkpoint_wrapped_module.``; FSDP2 keeps names but turns parameters into
DTensors. Adapter files, selection units and checkpoint checks use the functions here, passed in as
``unwrap`` / ``gather`` where the adapters take them, so the adapters never need to know which strategy ran.
"""

from __future__ import annotations

import torch

__all__ = ["WRAPPER_LEVELS", "full_cpu", "unwrapped_name"]

WRAPPER_LEVELS: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A module or parameter name without wrapper levels: the same name as in the unwrapped model."""
    for level in WRAPPER_LEVELS:
        name = name.replace(level, "")
    return name


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor; gathers a sharded DTensor first (a collective: every rank must get here)."""
    full = getattr(t, "full_tensor", None)
    t = full() if callable(full) else t
    return t.detach().to("cpu").contiguous()
