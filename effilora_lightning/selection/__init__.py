"""The selection (the paper's "Reducer"): which per-layer B train at each optimizer step. Pure PyTorch.

    config.py    SelectionConfig: the typed, validated settings both the Reducer and EffiLoRACallback take
    units.py     SelectableUnits: the B of a model grouped into units; effilora_units (ours)
    peft.py      peft_lora_units (PEFT LoRA's lora_B), selectable_units (ours or PEFT's), refusal messages
    reducer.py   per-unit scores, their EMA, the rule that picks K units; Reducer drives one model

EffiLoRACallback (effilora_lightning.callbacks) drives a Reducer from a Lightning run.
"""

from .config import FROZEN_SCORE, IMPORTANCE, SELECTION, SelectionConfig, SelectionValueError
from .peft import describe_adapters, has_selectable_units, peft_lora_units, selectable_units, trained_beside_units
from .reducer import ImportanceTracker, Reducer, local_unit_scores, num_kept, step_generator
from .units import SelectableUnits, effilora_units, unit_name

__all__ = [
    "FROZEN_SCORE", "IMPORTANCE", "SELECTION", "ImportanceTracker", "Reducer", "SelectableUnits", "SelectionConfig",
    "SelectionValueError", "describe_adapters", "effilora_units", "has_selectable_units", "local_unit_scores",
    "num_kept", "peft_lora_units", "selectable_units", "step_generator", "trained_beside_units", "unit_name",
]
