"""Find the target Linears (PEFT's matching rules), wrap them, freeze everything else, report.

``apply_adapter(model, config)`` is the one entry point; it works on any ``nn.Module`` (a Hugging Face
LLaMA, a LLaVA-style model, a user's own network). Inject before any sharding: FSDP never
synchronises gradients of parameters added after ``fully_shard``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import AdapterConfig, AdapterLinear, layer_index
from .method import is_adapter_param, method_of, param_group

__all__ = ["AdapterReport", "adapter_parameters", "apply_adapter", "match_modules", "adapter_config_of", "layer_index"]

# Module-name components that mark a vision tower or a multimodal projector: never adapted (by default).
VISION_MARKERS = frozenset(
    {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "mm_projector",
     "multi_modal_projector", "projector"}
)


@dataclass
class AdapterReport:
    """What ``apply_adapter`` did: wrapped modules and parameter counts (total and per group)."""

    method: str
    wrapped: list[str]
    trainable: int
    groups: dict[str, int]
    base_params: int
    base_trainable: int
    extras: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.base_params, 1)
        lines = [
            f"{self.method}: wrapped {len(self.wrapped)} modules",
            f"  trainable adapter params: {self.trainable:,} ({pct:.4f}% of base)",
            *(f"    {g:<9} {n:>14,}" for g, n in self.groups.items()),
            f"  base params: {self.base_params:,} (trainable: {self.base_trainable:,})",
        ]
        lines += [f"  {k}: {v}" for k, v in self.extras.items()]
        return "\n".join(lines)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_vision(name: str) -> bool:
    return not VISION_MARKERS.isdisjoint(name.split("."))


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def match_modules(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every module the config targets, in ``named_modules`` order."""
    head = _output_embedding(model)
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name or (cfg.exclude_vision and _is_vision(name)):
            continue
        if cfg.target_modules == "all-linear":
            hit = isinstance(module, nn.Linear) and module is not head and name.rsplit(".", 1)[-1] != "lm_head"
        else:
            hit = _matches(name, cfg.target_modules)
        if not hit or (cfg.exclude_modules is not None and _matches(name, cfg.exclude_modules)):
            continue
        if cfg.layers_to_transform is not None and layer_index(name) not in cfg.layers_to_transform:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target_modules matched '{name}', a {type(module).__name__}; only nn.Linear can be adapted. "
                "Narrow target_modules (e.g. list the projection names) or add it to exclude_modules."
            )
        found[name] = module
    if not found:
        raise ValueError(_no_match_message(model, cfg))
    return found


def _no_match_message(model: nn.Module, cfg: AdapterConfig) -> str:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    targets = [cfg.target_modules] if isinstance(cfg.target_modules, str) else cfg.target_modules
    close = list(dict.fromkeys(c for t in targets for c in difflib.get_close_matches(str(t), linear, n=3, cutoff=0.5)))
    hint = f" Close names: {close}." if close else ""
    return (
        f"target_modules={cfg.target_modules!r} matched no nn.Linear in {type(model).__name__} "
        f"(after exclude_modules / layers_to_transform / vision exclusion).{hint} "
        f"Linear module names in this model: {linear}."
    )


def _check_rank(cfg: AdapterConfig, layers: dict[str, nn.Linear]) -> None:
    for name, layer in layers.items():
        limit = min(layer.in_features, layer.out_features)
        if cfg.rank > limit:
            raise ValueError(
                f"rank={cfg.rank} is larger than '{name}' allows (in={layer.in_features}, out={layer.out_features}, "
                f"max rank {limit}). Lower rank or exclude that module."
            )


def _check_not_adapted(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            raise RuntimeError(
                f"'{name or type(model).__name__}' already carries an adapter: apply_adapter was called twice on "
                "this model. Build a fresh model, or load weights into the existing adapter with load_adapter."
            )


def _install(model: nn.Module, name: str, wrapper: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, wrapper)


def apply_adapter(model: nn.Module, config: AdapterConfig) -> AdapterReport:
    """Wrap the targeted Linears of ``model`` with ``config``'s adapter and freeze every other parameter.

    Raises:
        TypeError: unknown config type, or a target that is not an nn.Linear.
        ValueError: no module matched (close names listed), or rank too large for a module.
        RuntimeError: the model already has an adapter.
    """
    method = method_of(config)
    _check_not_adapted(model)
    layers = match_modules(model, config)
    _check_rank(config, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    roots, wrapped, extras = method.wrap(config, model, layers, gen)
    for attr, module in roots.items():
        model.add_module(attr, module)
    for name, wrapper in wrapped.items():
        _install(model, name, wrapper)
    object.__setattr__(model, "_effilora_adapter_config", config)
    return build_report(model, config, list(wrapped), extras)


def adapter_config_of(model: nn.Module) -> AdapterConfig | None:
    """The config ``apply_adapter`` used on ``model`` (or on a submodule), or None."""
    for module in model.modules():
        cfg = getattr(module, "_effilora_adapter_config", None)
        if cfg is not None:
            return cfg
    return None


def build_report(model: nn.Module, cfg: AdapterConfig, wrapped: list[str], extras: dict[str, Any]) -> AdapterReport:
    """Count adapter parameters per group and base parameters (adapter = by name, not requires_grad)."""
    groups = dict.fromkeys(("shared_a", "a", "b", "router"), 0)  # the usual order first; a method may add groups
    base = base_trainable = 0
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            group = param_group(name) or "b"
            groups[group] = groups.get(group, 0) + p.numel()
        else:
            base += p.numel()
            base_trainable += p.numel() if p.requires_grad else 0
    groups = {g: n for g, n in groups.items() if n}
    return AdapterReport(cfg.method, wrapped, sum(groups.values()), groups, base, base_trainable, extras)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The optimizer's parameters, from step 0: every adapter parameter by name, plus whatever requires grad now.

    By name (ours: ``effilora_`` / ``lora_`` / ``hydralora_`` / ``lily_``; PEFT LoRA's ``lora_*``), so a B that
    EffiLoRACallback has frozen is still included; plus every other parameter that requires grad at the call
    (a projector you unfroze, PEFT's ``modules_to_save``). Each parameter once, in ``named_parameters`` order::

        def configure_optimizers(self):
            return torch.optim.AdamW(adapter_parameters(self), lr=3e-4)
    """
    return [p for name, p in model.named_parameters() if p.requires_grad or is_adapter_param(name)]
