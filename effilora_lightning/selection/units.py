"""Selectable units: the per-layer B of a model grouped into the units the selection ranks and freezes.

``SelectableUnits`` is the one way the selection touches a model: which B exist, which unit each belongs to,
how large each unit is, and ``set_trainable``. Built by ``effilora_units`` (our EffiLoRA) or
``peft.peft_lora_units`` (PEFT LoRA's ``lora_B``). Pure PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import unwrapped_name
from ..adapters.effilora import EffiLoRALinear
from .config import Granularity

__all__ = ["Granularity", "SelectableUnits", "effilora_units", "unit_name"]

_LAYER_INDEX = re.compile(r"^\d+$")


def unit_name(module_name: str, granularity: Granularity) -> str:
    """The selectable unit a module belongs to: its decoder layer (up to the first integer) or itself."""
    if granularity == "module":
        return module_name
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if _LAYER_INDEX.match(part):
            return ".".join(parts[: i + 1])
    return module_name


@dataclass(frozen=True)
class SelectableUnits:
    """The B parameters grouped into selectable units, and the one way to set which of them train.

    Built by ``effilora_units`` (our EffiLoRA) or ``peft.peft_lora_units`` (PEFT LoRA's ``lora_B``).

    ``params`` is flat (every B once); ``unit_of_param[j]`` is the unit of ``params[j]``. Build it after
    any sharding: FSDP2 replaces Parameter objects when it shards them.
    """

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    unit_of_param: torch.Tensor  # (P,) int64, on CPU
    numel: torch.Tensor  # (U,) int64, parameters per unit (global, unsharded)
    param_names: tuple[str, ...] = ()  # names of ``params`` (refusals name the missing ones), or empty
    source: str = "EffiLoRA B"  # whose B these are, for messages and the callback's log line

    @property
    def num_units(self) -> int:
        return len(self.names)

    def set_trainable(self, selected: Sequence[bool] | torch.Tensor) -> None:
        """requires_grad=True on the B of selected units, False on the rest (autograd then skips them)."""
        flags = torch.as_tensor(selected, dtype=torch.bool).tolist()
        if len(flags) != self.num_units:
            raise ValueError(f"set_trainable got {len(flags)} flags for {self.num_units} units.")
        for p, u in zip(self.params, self.unit_of_param.tolist()):
            p.requires_grad_(flags[u])

    def trainable(self) -> torch.Tensor:
        """(U,) bool: a unit is trainable when all its B are."""
        out = torch.ones(self.num_units, dtype=torch.bool)
        for p, u in zip(self.params, self.unit_of_param.tolist()):
            out[u] &= p.requires_grad
        return out


def effilora_units(model: nn.Module, granularity: Granularity = "layer") -> SelectableUnits:
    """Collect every EffiLoRA B of ``model`` into units (default: one unit per decoder layer)."""
    if granularity not in ("layer", "module"):
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}.")
    names: list[str] = []
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    owner: list[int] = []
    numel: list[int] = []
    for mname, module in model.named_modules():
        if not isinstance(module, EffiLoRALinear):
            continue
        uname = unit_name(unwrapped_name(mname), granularity)
        if uname not in names:
            names.append(uname)
            numel.append(0)
        u = names.index(uname)
        for i, p in enumerate(module.b_params()):
            params.append(p)
            param_names.append(f"{unwrapped_name(mname)}.effilora_B.{i}")
            owner.append(u)
            numel[u] += module.out_features * module.rank  # the global size: FSDP1 leaves a rank a flat slice
    if not params:
        raise ValueError(
            "The model has no EffiLoRA modules. Call apply_adapter(model, EffiLoRAConfig(...)) first "
            "(in your LightningModule's configure_model), or remove EffiLoRACallback."
        )
    return SelectableUnits(tuple(names), tuple(params), torch.tensor(owner), torch.tensor(numel), tuple(param_names))
