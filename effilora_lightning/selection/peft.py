"""Selectable B units of a model adapted by PEFT LoRA, and the helpers that work on ours or PEFT's.

EffiLoRA's selective update needs no adapter of its own: any model whose layers add ``B_l A_l x`` has B to
rank and freeze. PEFT's ``get_peft_model(model, LoraConfig(...))`` builds such layers; this file finds their
``lora_B`` without importing peft (it is a test dependency only), by the attributes every PEFT LoRA layer has:

    PEFT LoRA layer (peft.tuners.lora.Linear, bnb / GPTQ variants, Conv, Embedding, ParamWrapper)
        lora_A           ModuleDict  adapter name -> nn.Linear(d_in, r)     trains every step (not selected)
        lora_B           ModuleDict  adapter name -> nn.Linear(r, d_out)    <- the units: the ACTIVE adapter's
        lora_embedding_B ParameterDict  (Embedding layers)                  <- likewise
        lora_magnitude_vector  (DoRA)                                        trains every step (not selected)
        active_adapters  list[str]

    selectable_units(model, granularity)   ours (effilora_units) or PEFT LoRA (peft_lora_units); refuses others

Pure PyTorch: nothing here imports lightning, transformers or peft.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..adapters.base import AdapterLinear, unwrapped_name
from ..adapters.effilora import EffiLoRALinear
from .units import Granularity, SelectableUnits, effilora_units, unit_name

__all__ = ["describe_adapters", "has_selectable_units", "is_peft_lora_layer", "peft_lora_units", "selectable_units",
           "trained_beside_units"]

def is_peft_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (duck-typed): ``lora_B`` a ModuleDict keyed by adapter name, and ``active_adapters``.

    AdaLoRA (``lora_B`` a ParameterDict, its own rank allocator) and our LoRALinear (``lora_B`` a Parameter) are not.
    """
    return isinstance(getattr(module, "lora_B", None), nn.ModuleDict) and hasattr(module, "active_adapters")


def _active_b(module: nn.Module) -> list[tuple[str, str, nn.Module | nn.Parameter]]:
    """(attribute, adapter name, B) for each active adapter of one PEFT LoRA layer that has a B here."""
    found: list[tuple[str, str, nn.Module | nn.Parameter]] = []
    for adapter in module.active_adapters:
        if adapter in module.lora_B:
            found.append(("lora_B", adapter, module.lora_B[adapter]))
        elif adapter in getattr(module, "lora_embedding_B", {}):
            found.append(("lora_embedding_B", adapter, module.lora_embedding_B[adapter]))
    return found


def _global_numel(b: nn.Module | nn.Parameter) -> int:
    """Elements of one B, whatever sharding left on this rank (a DTensor counts globally; FSDP1 keeps attributes)."""
    if isinstance(b, nn.Linear):
        return b.out_features * b.in_features + (b.out_features if b.bias is not None else 0)
    params = [b] if isinstance(b, nn.Parameter) else list(b.parameters())
    return sum(p.numel() for p in params)


def peft_lora_units(model: nn.Module, granularity: Granularity = "layer") -> SelectableUnits:
    """Collect the active adapter's ``lora_B`` of every PEFT LoRA layer into units (default: one per decoder layer).

    Raises:
        ValueError: no PEFT LoRA layer with an active adapter, or a layer whose adapter is merged into the base
            weight (its B no longer takes part in the forward).
    """
    names: list[str] = []
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    owner: list[int] = []
    numel: list[int] = []
    adapters: set[str] = set()
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if not is_peft_lora_layer(module):
            continue
        if getattr(module, "merged", False):
            raise ValueError(
                f"PEFT LoRA layer '{mname}' has its adapter merged into the base weight, so its lora_B takes no part "
                "in the forward. Call model.unmerge_adapter() before training (merge_and_unload after it)."
            )
        for attr, adapter, b in _active_b(module):
            uname = unit_name(unwrapped_name(mname), granularity)
            if uname not in names:
                names.append(uname)
                numel.append(0)
            u = names.index(uname)
            numel[u] += _global_numel(b)
            adapters.add(adapter)
            own = [("", b)] if isinstance(b, nn.Parameter) else list(b.named_parameters())
            for pname, p in own:
                if id(p) in seen:  # a B tied between layers counts once
                    continue
                seen.add(id(p))
                params.append(p)
                param_names.append(".".join(filter(None, (unwrapped_name(mname), attr, adapter, pname))))
                owner.append(u)
    if not params:
        raise ValueError(f"The model has no PEFT LoRA layer with an active adapter. {describe_adapters(model)}")
    source = f"PEFT LoRA lora_B of adapter {', '.join(repr(a) for a in sorted(adapters))}"
    return SelectableUnits(tuple(names), tuple(params), torch.tensor(owner), torch.tensor(numel),
                           param_names=tuple(param_names), source=source)


def selectable_units(model: nn.Module, granularity: Granularity = "layer") -> SelectableUnits:
    """The B units of ``model``: our EffiLoRA's (``effilora_units``) or PEFT LoRA's (``peft_lora_units``).

    Raises:
        ValueError: neither kind is present (the message says what was found and what to do), both are, or
            ``granularity`` is unknown.
    """
    if granularity not in ("layer", "module"):
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}.")
    ours = any(isinstance(m, EffiLoRALinear) for m in model.modules())
    peft = any(is_peft_lora_layer(m) for m in model.modules())
    if ours and peft:
        raise ValueError(
            "The model carries both EffiLoRA modules (apply_adapter) and PEFT LoRA layers (get_peft_model); the "
            "callback would not know whose B to select. Adapt the model with one of the two."
        )
    if ours:
        return effilora_units(model, granularity)
    if peft:
        return peft_lora_units(model, granularity)
    raise ValueError(f"The model has no EffiLoRA modules and no PEFT LoRA layers. {describe_adapters(model)}")


def has_selectable_units(model: nn.Module) -> bool:
    """Whether ``model`` has our EffiLoRA modules or PEFT LoRA layers (cheap: no units are built)."""
    return any(isinstance(m, EffiLoRALinear) or is_peft_lora_layer(m) for m in model.modules())


def describe_adapters(model: nn.Module) -> str:
    """What adapters ``model`` does have, and what to do about it: the second half of a refusal."""
    peft_types = _peft_types(model)
    ours = Counter(type(m).__name__ for m in model.modules() if isinstance(m, AdapterLinear))
    tuner_layers = Counter(f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
                           if hasattr(type(m), "adapter_layer_names") and not is_peft_lora_layer(m))
    found = []
    if peft_types:
        found.append("a PEFT model with adapters " + ", ".join(f"{n!r} ({t})" for n, t in peft_types.items()))
    if tuner_layers:
        found.append("PEFT tuner layers " + ", ".join(f"{k} x{v}" for k, v in sorted(tuner_layers.items())))
    if ours:
        found.append("effilora_lightning adapters " + ", ".join(f"{k} x{v}" for k, v in sorted(ours.items())))
    if not found:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        found.append(f"no adapter at all ({trainable:,} parameters require grad)")
    return (
        f"Found: {'; '.join(found)}. EffiLoRACallback selects the per-layer B of EffiLoRA (apply_adapter(model, "
        "EffiLoRAConfig(...)) in configure_model) or of PEFT LoRA (peft.get_peft_model(model, LoraConfig(...))); "
        "prompt/prefix tuning, IA3, AdaLoRA (its own rank allocator) and our LoRA / HydraLoRA / Lily have no such "
        "B to select: switch to one of the two, or remove the callback."
    )


def _peft_types(model: nn.Module) -> dict[str, str]:
    """adapter name -> PEFT type (e.g. 'PROMPT_TUNING') from a ``peft_config`` dict anywhere in the model."""
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and configs:
            return {name: str(getattr(getattr(c, "peft_type", None), "value", getattr(c, "peft_type", "?")))
                    for name, c in configs.items()}
    return {}


_ALWAYS_TRAINED = (  # name marker -> how the log line calls it; the first match wins
    ("lora_magnitude_vector", "DoRA magnitude vectors (lora_magnitude_vector, which stay trainable: the callback selects B only)"),
    ("lora_embedding_A", "lora_embedding_A"),
    ("lora_A", "lora_A"),
    ("effilora_shared_a", "shared A"),
    ("effilora_router", "routers"),
    ("modules_to_save", "PEFT modules_to_save"),
    ("mm_projector", "the multimodal projector"),
)


def trained_beside_units(model: nn.Module, units: SelectableUnits) -> dict[str, int]:
    """What else requires grad (and so trains every step, never selected): kind -> parameter count."""
    in_units = {id(p) for p in units.params}
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in in_units:
            continue
        parts = name.split(".")
        kind = next((label for marker, label in _ALWAYS_TRAINED if marker in parts), "other parameters")
        counts[kind] += p.numel()
    return dict(counts)
