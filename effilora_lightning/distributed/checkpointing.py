"""AdapterModelParallelStrategy: FSDP2 (Lightning's ModelParallelStrategy) with adapter-only sharded checkpoints.

Saving needs nothing new: with ``save_distributed_checkpoint=True`` Lightning writes, through
``torch.distributed.checkpoint`` (DCP), whatever ``checkpoint["state_dict"]`` holds once the module's
``on_save_checkpoint`` has run, and CausalLMModule drops the frozen base weights there. Loading is what
Lightning cannot do: it asks DCP for EVERY key of the model, and DCP refuses a checkpoint that lacks the base
keys. This strategy asks only for the model keys the checkpoint holds, after checking that they are exactly
the ones the model expects (same names, same shapes), then restores the optimizer states and the rest as
Lightning does. Single-file checkpoints (``save_distributed_checkpoint=False``) take Lightning's own path.

In YAML::

    strategy:
      class_path: effilora_lightning.strategies.AdapterModelParallelStrategy
      init_args: {data_parallel_size: 16, tensor_parallel_size: 1}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from ..adapters.export import methods_in
from ..checkpoint_io import check_checkpoint_file
from .private import saves_distributed_checkpoint

__all__ = ["AdapterModelParallelStrategy", "check_checkpoint_keys", "describe_adapter", "saved_model_shapes",
           "saves_full_shards"]

MODEL_KEY = "state_dict"  # where Lightning's ModelParallelStrategy puts the model state in a DCP checkpoint
LIGHTNING_META_FILE = "meta.pt"  # the rest of a sharded Lightning checkpoint (loops, callbacks, ...), beside the shards
DCP_METADATA_FILE = ".metadata"  # written by torch.distributed.checkpoint into every checkpoint directory
_SHOWN = 5  # keys named per kind of mismatch in an error


def saved_model_shapes(path: str | Path) -> dict[str, torch.Size | None]:
    """The model state-dict keys a DCP checkpoint directory holds, with their global shapes (None: not a tensor).

    Read from the checkpoint's metadata only: no tensor is loaded.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = MODEL_KEY + "."
    metadata = _read_metadata(path)
    return {
        key[len(prefix):]: entry.size if isinstance(entry, TensorStorageMetadata) else None
        for key, entry in metadata.items()
        if key.startswith(prefix)
    }


def _read_metadata(path: str | Path) -> dict[str, Any]:
    """Flattened key -> storage metadata of a DCP checkpoint directory (``state_dict.<key>``,
    ``optimizer_<i>.state.<fqn>.<name>``, ...)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def check_checkpoint_keys(
    saved: Mapping[str, torch.Size | None],
    model: Mapping[str, torch.Size | None],
    required: Iterable[str],
    path: str | Path,
    holds: str | None = None,
    expects: str | None = None,
) -> None:
    """Refuse a checkpoint whose model keys are not the model's: some missing, unknown or of another shape.

    Args:
        saved: key -> shape of what the checkpoint holds (``saved_model_shapes``).
        model: key -> global shape of the model's state dict.
        required: the keys the checkpoint must hold (an adapter-only checkpoint: the adapter keys).
        path: the checkpoint, named in the error.
        holds / expects: the adapter the checkpoint holds and the one the model carries (``describe_adapter``),
            named in the error when given.
    """
    missing = sorted(set(required) - set(saved))
    unexpected = sorted(set(saved) - set(model))
    reshaped = sorted(k for k in set(saved) & set(model) if _shape(saved[k]) != _shape(model[k]))
    if not (missing or unexpected or reshaped):
        return
    reshaped_shapes = [f"{k} {_shape(saved[k])} vs {_shape(model[k])}" for k in reshaped]
    problems = [
        _describe(keys, label)
        for keys, label in (
            (missing, "missing from the checkpoint"),
            (unexpected, "in the checkpoint but not in the model"),
            (reshaped_shapes, "of another shape (checkpoint vs model)"),
        )
        if keys
    ]
    if holds is None:
        holds = describe_adapter(None, saved)
    adapters = f"It holds {holds}" + (f"; this model carries {expects}" if expects else "") + ".\n"
    raise ValueError(
        f"The checkpoint {path} does not fit this model's adapter:\n" + "\n".join(problems) + "\n" + adapters +
        "Resume with the adapter configuration the checkpoint was trained with (method, rank, target_modules, "
        "num_heads), or drop ckpt_path to start a new run."
    )


def describe_adapter(config: Mapping[str, Any] | None, keys: Iterable[str]) -> str:
    """``a lora adapter (rank=4, target_modules=['q_proj'])`` from a saved ``AdapterConfig.to_dict()``, else the
    methods whose parameter prefixes the keys carry (checkpoints written before the config was saved)."""
    if config:
        shown = ", ".join(f"{k}={config[k]!r}" for k in ("rank", "target_modules", "num_heads") if k in config)
        return f"a {config.get('method', '?')} adapter ({shown})"
    methods = methods_in(keys)
    return f"{' and '.join(methods)} adapter weights" if methods else "no adapter weights"


def _describe(items: list[str], label: str) -> str:
    """One line of the error: how many keys, what is wrong with them, the first few."""
    more = " ..." if len(items) > _SHOWN else ""
    return f"  {len(items)} key{'s' * (len(items) != 1)} {label}: {', '.join(items[:_SHOWN])}{more}"


def _shape(size: torch.Size | None) -> tuple[int, ...] | None:
    return None if size is None else tuple(size)


class AdapterModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (FSDP2) that resumes from sharded checkpoints holding only part of the model.

    Which keys a checkpoint must hold comes from the LightningModule: its ``in_checkpoint(key)`` (CausalLMModule:
    adapter weights and ``keep_in_checkpoint``); without that method, every key when ``strict_loading`` is on,
    none otherwise. Keys the checkpoint holds but the model lacks, or holds in another shape, are always an
    error, raised on every rank alike (so no rank waits in a collective).
    """

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Restore model keys the checkpoint holds, optimizer states; return the rest (loops, callbacks...)."""
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / DCP_METADATA_FILE).is_file()):
            check_checkpoint_file(path)  # Lightning reads single files itself here, not through the CheckpointIO
            return super().load_checkpoint(path, weights_only=weights_only)
        self._load_model_state(path)
        self._load_optimizer_states(path)
        return torch.load(path / LIGHTNING_META_FILE, weights_only=weights_only)

    def _load_model_state(self, path: Path) -> None:
        """Check the checkpoint's model keys against the model, then load those keys only into the shards."""
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        state = get_model_state_dict(self.model)
        saved = saved_model_shapes(path)
        check_checkpoint_keys(saved, {k: _global_shape(v) for k, v in state.items()}, self._required_keys(state), path)
        partial = {MODEL_KEY: {key: state[key] for key in saved}}
        load(partial, checkpoint_id=path)
        set_model_state_dict(self.model, partial[MODEL_KEY], options=StateDictOptions(strict=False))

    def _load_optimizer_states(self, path: Path) -> None:
        """Each optimizer from its ``optimizer_<i>`` entry (adapter parameters only).

        A parameter that never had a gradient before the save (a B no selection had picked yet) has no state
        in the checkpoint, and must have none after loading: AdamW creates it at that parameter's first step,
        exactly as in the uninterrupted run. So only the saved entries are read and loaded (``strict=False``).
        """
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        saved = set(_read_metadata(path))
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            template = get_optimizer_state_dict(self.model, optimizer)  # every parameter, states initialised
            template["state"] = {
                fqn: entry for fqn, entry in template["state"].items()
                if all(f"{key}.state.{fqn}.{name}" in saved for name in entry)
            }
            state = {key: template}
            load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key],
                                     options=StateDictOptions(cpu_offload=True, strict=False))

    def _required_keys(self, state: Mapping[str, Any]) -> list[str]:
        """The model keys a checkpoint must hold, as the LightningModule saves them (see the class docstring)."""
        module = self.lightning_module
        in_checkpoint: Callable[[str], bool] | None = getattr(module, "in_checkpoint", None)
        if in_checkpoint is not None:
            return [key for key in state if in_checkpoint(key)]
        return list(state) if module.strict_loading else []


def _global_shape(value: Any) -> torch.Size | None:
    """A state-dict entry's full shape (a DTensor's ``shape`` is already the global one)."""
    return value.shape if isinstance(value, torch.Tensor) else None


def saves_full_shards(strategy: object) -> bool:
    """Lightning's own ModelParallelStrategy writing sharded checkpoints: it can only resume from full ones, so
    there each rank keeps its 1/N shard of everything (``AdapterModelParallelStrategy`` loads adapter-only ones)."""
    return (
        isinstance(strategy, ModelParallelStrategy)
        and not isinstance(strategy, AdapterModelParallelStrategy)
        and saves_distributed_checkpoint(strategy)
    )
