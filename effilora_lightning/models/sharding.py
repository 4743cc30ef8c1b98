"""Moved to ``effilora_lightning.distributed`` (fsdp2.py, fsdp1.py); kept importable for projects that import it."""

from ..distributed.fsdp1 import fsdp1_rank0_load_kwargs, fsdp1_wrap_policy, gathered_for_export
from ..distributed.fsdp2 import decoder_layers, materialize_from_rank0, root_unsharded, shard_model

__all__ = [
    "decoder_layers", "fsdp1_rank0_load_kwargs", "fsdp1_wrap_policy", "gathered_for_export", "materialize_from_rank0",
    "root_unsharded", "shard_model",
]
