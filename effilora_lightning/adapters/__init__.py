"""Pure-PyTorch adapters: LoRA, EffiLoRA, HydraLoRA, Lily; injection, save/load, merge, PEFT export.

Nothing here imports lightning or transformers, so any ``nn.Module`` can be adapted.
"""

from .base import ADAPTER_PREFIXES, AdapterConfig, AdapterLinear, is_adapter_param, param_group
from .effilora import EffiLoRAConfig, EffiLoRALinear
from .export import export_peft_lora, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from .hydralora import HydraLoRAConfig, HydraLoRALinear
from .inject import AdapterReport, adapter_config_of, adapter_parameters, apply_adapter
from .lily import LilyConfig, LilyLinear
from .lora import LoRAConfig, LoRALinear

__all__ = [
    "ADAPTER_PREFIXES", "AdapterConfig", "AdapterLinear", "AdapterReport", "EffiLoRAConfig", "EffiLoRALinear",
    "HydraLoRAConfig", "HydraLoRALinear", "LilyConfig", "LilyLinear", "LoRAConfig", "LoRALinear",
    "adapter_config_of", "adapter_parameters", "apply_adapter", "export_peft_lora",
    "is_adapter_param", "load_adapter", "merge_adapter", "param_group", "save_adapter", "unmerge_adapter",
]
