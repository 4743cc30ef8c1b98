"""What a fine-tuning checkpoint holds: the adapter weights (and the module's ``keep_in_checkpoint`` keys, e.g. a
trained projector), never the frozen base (it reloads from model_path), and a check on load that the saved keys
are exactly the ones this model saves.

Except for sharded checkpoints written by Lightning's own ModelParallelStrategy: it reloads every key of the
model and would miss the base keys, so there each rank keeps its 1/N shard of everything (a start-up warning
names AdapterModelParallelStrategy, which loads adapter-only sharded checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters import is_adapter_param
from ..distributed import fsdp1
from ..distributed.checkpointing import check_checkpoint_keys, describe_adapter, saves_full_shards
from ..distributed.names import unwrapped_name
from ..distributed.private import attached_trainer

__all__ = ["CONTENTS_KEY", "check_loaded_keys", "is_saved", "keep_adapter_only", "state_shapes"]

CONTENTS_KEY = "effilora_lightning"  # checkpoint entry: the adapter config and the saved keys with their shapes


def is_saved(module: Any, key: str) -> bool:
    """Whether a state-dict key is saved in checkpoints (and so required when resuming from one)."""
    return is_adapter_param(key) or module.keep_in_checkpoint(key)


def _keeps_everything(module: Any) -> bool:
    trainer = attached_trainer(module)
    return trainer is not None and saves_full_shards(trainer.strategy)


def keep_adapter_only(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: drop every key ``is_saved`` refuses, and record the adapter config and the saved
    keys with their shapes (checked on load under every strategy: FSDP ones load single files themselves and
    hand ``on_load_checkpoint`` no state_dict)."""
    if _keeps_everything(module):
        return
    state = checkpoint["state_dict"]
    for key in [k for k in state if not is_saved(module, k)]:
        del state[key]
    adapter = module.adapter.to_dict() if module.adapter is not None else None
    checkpoint[CONTENTS_KEY] = {"adapter": adapter,
                                "keys": {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)}}


def check_loaded_keys(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: refuse a checkpoint whose saved keys are not the ones this model saves (fit,
    validate and test alike), naming the missing and unexpected keys and the adapter it holds. Lightning loads
    non-strictly (base weights are not in checkpoints), so a LoRA checkpoint would otherwise load into an
    EffiLoRA model as nothing at all, and a resume would fail later on the optimizer's parameter groups."""
    if module.model is None or _keeps_everything(module):
        return
    contents = checkpoint.get(CONTENTS_KEY) or {}
    if "keys" in contents:
        saved: dict[str, Any] = {k: torch.Size(v) for k, v in contents["keys"].items()}
    elif isinstance(checkpoint.get("state_dict"), dict):
        saved = {k: v.shape if torch.is_tensor(v) else None for k, v in checkpoint["state_dict"].items()}
    else:
        return  # a sharded checkpoint: AdapterModelParallelStrategy checked its keys while loading
    model = state_shapes(module)
    if any(shape is None for shape in model.values()):  # FSDP1: flat shards, names only
        saved = dict.fromkeys(saved)
    trainer = attached_trainer(module)
    path = (trainer.ckpt_path if trainer is not None else None) or "being loaded"
    expects = describe_adapter(module.adapter.to_dict() if module.adapter else None, ())
    check_checkpoint_keys(saved, model, [k for k in model if is_saved(module, k)], path,
                          holds=describe_adapter(contents.get("adapter"), saved), expects=expects)


def state_shapes(module: Any) -> dict[str, torch.Size | None]:
    """State-dict key -> global shape; under FSDP1 names only (its parameters are flat shards here)."""
    if fsdp1.fsdp1_strategy(attached_trainer(module)) is None:
        return {k: v.shape if torch.is_tensor(v) else None for k, v in module.state_dict().items()}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {unwrapped_name(n): None for n, _ in named}
