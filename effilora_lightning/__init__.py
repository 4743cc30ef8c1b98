"""effilora_lightning: fine-tune LLaMA-3 and LLaVA-style models with EffiLoRA in PyTorch Lightning.

The adapters (pure PyTorch) import eagerly; the Lightning pieces load on first use, so that
``from effilora_lightning import EffiLoRAConfig, apply_adapter`` stays cheap.
"""

from importlib import import_module
from typing import Any

from .adapters import AdapterReport, EffiLoRAConfig, HydraLoRAConfig, LilyConfig, LoRAConfig, apply_adapter
from .adapters.inject import adapter_parameters
from .selection.config import SelectionConfig

__version__ = "0.1.0"

_LAZY = {
    "AdapterModelParallelStrategy": "effilora_lightning.strategies",
    "EffiLoRACallback": "effilora_lightning.callbacks",
    "EfficiencyMonitor": "effilora_lightning.callbacks",
    "FineTuneModule": "effilora_lightning.models",
    "CausalLMModule": "effilora_lightning.models",
    "VisionLanguageModule": "effilora_lightning.models",
    "CommonsenseDataModule": "effilora_lightning.data",
    "VisualInstructionDataModule": "effilora_lightning.data",
}

__all__ = ["AdapterReport", "EffiLoRAConfig", "HydraLoRAConfig", "LilyConfig", "LoRAConfig", "SelectionConfig",
           "adapter_parameters", "apply_adapter", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'effilora_lightning' has no attribute {name!r}")
