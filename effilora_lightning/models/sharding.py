"""FSDP2 (``fully_shard``) for adapted Hugging Face models, as ModelParallelStrategy expects it.

Order matters (PITFALLS.md): adapters are injected first, then every decoder layer becomes its own FSDP
group, then the root. The shared EffiLoRA A (and Lily's HP/LP) live at the root, so each is managed by
exactly one group (the root's) and is all-gathered once per forward, before any layer reads it.

Mixed precision: parameters are all-gathered in ``param_dtype`` (bf16 on GPU) and gradients are reduced in
fp32; the sharded master copies keep their own dtype (fp32 adapters stay fp32).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["decoder_layers", "shard_model"]

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
