"""Adapter files: save/load (safetensors + json), merge into the base, export as a PEFT LoRA adapter.

Keys are stored relative to the module ``apply_adapter`` was called on, so an adapter saved from a
LightningModule (``model.layers.0...`` under ``self.model``) loads onto the bare Hugging Face model.
Files are written once (rank 0), into a temporary directory renamed into place: a crash mid-write
never leaves a half adapter behind. Sharded (DTensor) parameters are gathered first; every rank
must call ``save_adapter`` / ``export_peft_lora`` then, since the gather is a collective. FSDP1 keeps flat
slices of its parameters outside forward: call these inside ``FullyShardedDataParallel.summon_full_params``
of the root wrapper (``distributed.fsdp1.gathered_for_export`` does it for a Lightning run); wrapper levels
(``_fsdp_wrapped_module.``) never reach a file: names pass through ``unwrap`` (``distributed.names``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed.names import full_cpu, unwrapped_name
from .base import AdapterConfig, AdapterLinear
from .inject import AdapterReport, adapter_config_of, apply_adapter
from .method import adapter_prefixes, is_adapter_param, method_named, method_of

__all__ = ["save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter", "export_peft_lora",
           "check_safetensors_file", "methods_in", "read_adapter_config", "read_safetensors"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "effilora_lightning.adapter/1"


def _adapter_root(model: nn.Module) -> tuple[str, nn.Module, AdapterConfig]:
    """(prefix, module, config) of the module apply_adapter was called on."""
    for name, module in model.named_modules():
        cfg = getattr(module, "_effilora_adapter_config", None)
        if cfg is not None:
            return (name + "." if name else ""), module, cfg
    raise ValueError(f"{type(model).__name__} has no adapter: call apply_adapter(model, config) first.")


Unwrap = Callable[[str], str]
Gather = Callable[[torch.Tensor], torch.Tensor]


def _named(items: Any, unwrap: Unwrap) -> Any:
    """``named_parameters()`` / ``named_modules()`` with each name as the unwrapped model has it."""
    return ((unwrap(name), obj) for name, obj in items)


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("effilora_lightning", "torch", "transformers", "lightning", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_dir_atomically(directory: Path, files: dict[str, Any]) -> None:
    """Write {filename: dict-of-tensors | json-able} into a temp dir, then rename it to ``directory``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    for fname, content in files.items():
        if fname.endswith(".safetensors"):
            save_file(content, str(tmp / fname), metadata={"format": "pt"})
        else:
            (tmp / fname).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old)


def adapter_state(model: nn.Module, unwrap: Unwrap = unwrapped_name, gather: Gather = full_cpu
                  ) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict[str, Any]]:
    """Adapter tensors (by name, frozen ones included), the config, and the wrapped-module map.

    ``unwrap`` maps a name to the unwrapped model's (default: strips FSDP1 / checkpoint-wrapper levels);
    ``gather`` makes a full CPU tensor of a parameter (default: gathers a DTensor, a collective).
    """
    prefix, root, cfg = _adapter_root(model)
    tensors = {n: gather(p) for n, p in _named(root.named_parameters(), unwrap) if is_adapter_param(n)}
    target_map = {
        n: {"in_features": m.in_features, "out_features": m.out_features, "class": type(m).__name__}
        for n, m in _named(root.named_modules(), unwrap)
        if isinstance(m, AdapterLinear)
    }
    return tensors, cfg, target_map


def save_adapter(model: nn.Module, directory: str | Path, unwrap: Unwrap = unwrapped_name,
                 gather: Gather = full_cpu) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (method, config, target map, versions).
    ``unwrap`` / ``gather``: as in ``adapter_state``."""
    tensors, cfg, target_map = adapter_state(model, unwrap, gather)
    directory = Path(directory)
    if _is_rank0():
        meta = {"format": FORMAT, "method": cfg.method, "config": cfg.to_dict(), "target_map": target_map,
                "versions": _versions()}
        _write_dir_atomically(directory, {WEIGHTS_NAME: tensors, CONFIG_NAME: meta})
    return directory


def read_adapter_config(directory: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """Parse ``adapter_config.json`` back into a config dataclass.

    Raises a FileNotFoundError or ValueError naming the file and what is wrong with it: not JSON, another
    format, an unknown method (close names listed), or a field that method does not take.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No adapter config at {path}: expected a directory written by save_adapter.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with save_adapter.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not an effilora_lightning adapter (format={found!r}, expected {FORMAT!r}).")
    fields = dict(meta.get("config") or {})
    method = fields.pop("method", meta.get("method"))
    config = method_named(method, where=str(path)).config
    try:
        return config(**fields), meta
    except TypeError as err:
        raise ValueError(f"{path}: its config does not fit {config.__name__}: {err}.") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` after ``check_safetensors_file``; any read error names the file."""
    check_safetensors_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} cannot be read as safetensors ({err}). Write or copy the file again.") from None


def methods_in(keys: Iterable[str]) -> list[str]:
    """The adapter methods whose parameter prefixes (``lora_``, ``effilora_`` ...) occur in ``keys``, sorted."""
    return sorted({part.split("_", 1)[0] for key in keys for part in key.split(".") if part.startswith(adapter_prefixes())})


def check_safetensors_file(path: str | Path) -> None:
    """Refuse a ``.safetensors`` file cut short or not one at all, naming it, before any tensor is read.

    The file is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    data: a complete file is at least as long as the end of the last range.
    """
    file = Path(path)
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{file} ({size} bytes) is not a complete safetensors file: its header is cut short or "
                         "unreadable. Write or copy the file again.")
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(f"{file} is truncated: {size} bytes, but its header places tensor data up to byte "
                         f"{8 + length + end}. Write or copy the file again.")


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterReport | None:
    """Load a saved adapter into ``model``; applies the saved config first if the model has no adapter.

    Raises a ValueError naming the module and both shapes when the model does not fit the file.
    """
    cfg, meta = read_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No adapter weights at {weights}.")
    saved = read_safetensors(weights)
    found = methods_in(saved)
    if found != [cfg.method]:
        raise ValueError(f"{directory}: {CONFIG_NAME} says {cfg.method}, but the weights in {WEIGHTS_NAME} are "
                         f"{' and '.join(found) or 'no adapter weights'}: the two files come from different "
                         "adapters. Save the adapter again with save_adapter.")
    report = apply_adapter(model, cfg) if adapter_config_of(model) is None else None
    _, root, current = _adapter_root(model)
    if current.method != cfg.method:
        raise ValueError(f"{directory} holds a {cfg.method} adapter but the model carries {current.method}.")
    params = {n: p for n, p in root.named_parameters() if is_adapter_param(n)}
    _check_fit(saved, params, weights)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return report


def _check_fit(saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor], path: Path) -> None:
    for name, tensor in saved.items():
        if name not in params:
            raise ValueError(f"{path}: '{name}' has no matching adapter parameter in the model (module missing).")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{path}: shape mismatch at '{name}': file has {tuple(tensor.shape)}, model has {tuple(params[name].shape)}."
            )
    missing = sorted(set(params) - set(saved))
    if missing:
        raise ValueError(f"{path}: the model has adapter parameters the file lacks, e.g. {missing[:3]}.")


def _linears(model: nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


def merge_adapter(model: nn.Module) -> None:
    """W0 += update for every wrapped module (fp32 math, cast back). Idempotent. Checks all first."""
    layers = _linears(model)
    cfg = adapter_config_of(model)
    if layers and cfg is not None and not method_of(cfg).merges(cfg):
        layers[0].delta_weight()  # raises the method's explanation (e.g. routed updates)
        raise ValueError(f"{cfg.method} adapters cannot be merged into the base weights.")
    for m in layers:
        m.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo ``merge_adapter``. Idempotent."""
    for m in _linears(model):
        m.unmerge()


def export_peft_lora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                     unwrap: Unwrap = unwrapped_name, gather: Gather = full_cpu) -> Path:
    """Write a standard PEFT LoRA adapter: any method whose update is exactly LoRA's (``AdapterMethod.is_lora``):
    LoRA, and EffiLoRA with one head (its shared A copied into each layer).

    ``peft.PeftModel.from_pretrained(base, directory)`` then reproduces the adapted model's outputs.
    """
    prefix, root, cfg = _adapter_root(model)
    method = method_of(cfg)
    if not method.exports_peft_lora(cfg):
        raise ValueError(
            f"Only LoRA and single-head EffiLoRA are PEFT LoRA adapters; {cfg.method} "
            f"(num_heads={getattr(cfg, 'num_heads', None)}) routes per input and has no LoRA equivalent."
        )
    tensors: dict[str, torch.Tensor] = {}
    names = []
    for name, m in _named(root.named_modules(), unwrap):
        if not isinstance(m, method.layer):
            continue
        a, b = method.lora_factors(m)
        names.append(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = gather(a).clone()  # clone: no shared storage in safetensors
        tensors[f"base_model.model.{name}.lora_B.weight"] = gather(b)
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        "base_model_name_or_path": base_model_name_or_path, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True,
    }
    directory = Path(directory)
    if _is_rank0():
        _write_dir_atomically(directory, {WEIGHTS_NAME: tensors, CONFIG_NAME: peft_cfg})
    return directory
