"""The method protocol: everything injection, export, the report and the optimizer groups need to know about
one adapter method, declared once, in that method's own file.

    lora.py / effilora.py / hydralora.py / lily.py        each ends with   register_method(AdapterMethod(...))
        config       the dataclass users write in YAML (its ``method`` names the method)
        layer        the AdapterLinear subclass wrapping one frozen nn.Linear
        groups       parameter-name component -> optimizer/report group ("shared_a", "a", "b", "router", ...)
        build        how to wrap the matched Linears, and which modules to add at the model root (a shared A)
        merges       whether a config's update is a static weight (merge_adapter)
        lora_factors (A, B) of one wrapper when the update is exactly LoRA's, for the PEFT LoRA export

    inject.py, export.py and the Lightning modules ask ``method_of(config)``; they hold no table of methods.

A parameter of a method's adapter has a dotted name component starting with ``<name>_`` (``lora_A``,
``effilora_B``): checkpoints and optimizer groups select adapter weights by that prefix, never by
``requires_grad`` (a B frozen at save time must still be saved). A fifth method is one new file that defines
its config and layer and registers them (tests/adapters/test_method_protocol.py does it with a toy method).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import AdapterConfig, AdapterLinear

__all__ = [
    "AdapterMethod", "Built", "adapter_prefixes", "is_adapter_param", "method_named", "method_of", "param_group",
    "register_method", "registered_methods", "temporarily_registered", "wrap_each",
]

Built = tuple[dict[str, nn.Module], dict[str, AdapterLinear], dict[str, Any]]
"""What a build returns: (modules to add at the model root, name -> wrapper, extras for the report)."""

Build = Callable[[AdapterConfig, nn.Module, dict[str, nn.Linear], torch.Generator], Built]


def wrap_each(cfg: AdapterConfig, model: nn.Module, layers: dict[str, nn.Linear], gen: torch.Generator,
              *, layer: type[AdapterLinear]) -> Built:
    """The default build: one ``layer(base, cfg, gen)`` per matched Linear, nothing at the root."""
    return {}, {name: layer(base, cfg, gen) for name, base in layers.items()}, {}


def _never(_: AdapterConfig) -> bool:
    return False


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method, as the rest of the package sees it (see the module docstring)."""

    name: str
    config: type[AdapterConfig]
    layer: type[AdapterLinear]
    groups: Mapping[str, str]
    """Parameter-name component (``lora_A``) -> group (``a``); a name's first matching component decides."""
    build: Build | None = None
    """None: ``wrap_each`` with ``layer``."""
    merges: Callable[[AdapterConfig], bool] = _never
    lora_factors: Callable[[AdapterLinear], tuple[torch.Tensor, torch.Tensor]] | None = None
    """(A (r, d_in), B (d_out, r)) of one wrapper whose update is (alpha / r) B A; None: not a LoRA."""
    is_lora: Callable[[AdapterConfig], bool] = _never
    """Whether this config's update is exactly LoRA's, so ``export_peft_lora`` can write it."""

    @property
    def prefix(self) -> str:
        return self.name + "_"

    def wrap(self, cfg: AdapterConfig, model: nn.Module, layers: dict[str, nn.Linear], gen: torch.Generator) -> Built:
        if self.build is not None:
            return self.build(cfg, model, layers, gen)
        return wrap_each(cfg, model, layers, gen, layer=self.layer)

    def exports_peft_lora(self, cfg: AdapterConfig) -> bool:
        return self.lora_factors is not None and self.is_lora(cfg)


_METHODS: dict[str, AdapterMethod] = {}
_PREFIXES: tuple[str, ...] = ()
_GROUPS: dict[str, str] = {}


def _refresh() -> None:
    global _PREFIXES, _GROUPS
    _PREFIXES = tuple(m.prefix for m in _METHODS.values())
    _GROUPS = {part: group for m in _METHODS.values() for part, group in m.groups.items()}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Make ``method`` known to apply_adapter, save/load, merge, export and the optimizer groups; returns it.

    Raises:
        ValueError: the name is taken, the config's or layer's ``method`` is another name, or a group marker
            does not start with the method's prefix.
    """
    strays = [part for part in method.groups if not part.startswith(method.prefix)]
    if strays:
        raise ValueError(f"Adapter method {method.name!r}: parameter names {strays} do not start with "
                         f"{method.prefix!r}; checkpoints select adapter weights by that prefix.")
    for owner in (method.config, method.layer):
        if owner.method != method.name:
            raise ValueError(f"{owner.__name__}.method is {owner.method!r}, but it is registered as {method.name!r}.")
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"An adapter method named {method.name!r} is already registered "
                         f"({_METHODS[method.name].config.__name__}); pick another name.")
    _METHODS[method.name] = method
    _refresh()
    return method


@contextlib.contextmanager
def temporarily_registered(method: AdapterMethod) -> Iterator[AdapterMethod]:
    """Register ``method`` for the duration of a block (tests of a toy method)."""
    register_method(method)
    try:
        yield method
    finally:
        _METHODS.pop(method.name, None)
        _refresh()


def registered_methods() -> tuple[AdapterMethod, ...]:
    return tuple(_METHODS.values())


def adapter_prefixes() -> tuple[str, ...]:
    """``("lora_", "effilora_", ...)``: every registered method's parameter prefix."""
    return _PREFIXES


def is_adapter_param(name: str) -> bool:
    """True when a parameter/state-dict name belongs to an adapter (a component starts with a method's prefix)."""
    return any(part.startswith(_PREFIXES) for part in name.split("."))


def param_group(name: str) -> str | None:
    """Optimizer/report group of an adapter parameter name (shared_a, a, b, router, ...); None if not an adapter."""
    for part in name.split("."):
        group = _GROUPS.get(part)
        if group is not None:
            return group
    return None


def method_named(name: str, where: str = "") -> AdapterMethod:
    """The registered method called ``name``; a ValueError lists the known ones (and close names)."""
    if name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(str(name), list(_METHODS), n=2, cutoff=0.8)  # not dora -> lora
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ValueError(f"{where}{' names' if where else 'Unknown'} the adapter method {name!r}{hint}; "
                     f"known methods: {', '.join(_METHODS)}.")


def method_of(cfg: AdapterConfig) -> AdapterMethod:
    """The method a config belongs to. Raises a TypeError for anything that is not a registered config."""
    method = _METHODS.get(getattr(cfg, "method", None)) if isinstance(cfg, AdapterConfig) else None
    if method is None or not isinstance(cfg, method.config):
        known = ", ".join(m.config.__name__ for m in _METHODS.values())
        raise TypeError(f"apply_adapter needs a {known} (a registered adapter method's config), "
                        f"got {type(cfg).__name__}.")
    return method
