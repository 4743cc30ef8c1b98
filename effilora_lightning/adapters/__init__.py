"""Pure-PyTorch adapters: LoRA, EffiLoRA, HydraLoRA, Lily; injection, save/load, merge, PEFT export.

Each method is one file that registers an ``AdapterMethod`` (method.py); the rest asks the registry.

Nothing here imports lightning or transformers, so any ``nn.Module`` can be adapted.
"""

# ruff: noqa: I001  (unsorted on purpose: the methods register in import order, the order messages list them in)
from .base import AdapterConfig, AdapterLinear
from .method import AdapterMethod, is_adapter_param, method_of, param_group, register_method, registered_methods
from .lora import LoRAConfig, LoRALinear
from .effilora import EffiLoRAConfig, EffiLoRALinear
from .hydralora import HydraLoRAConfig, HydraLoRALinear
from .lily import LilyConfig, LilyLinear
from .export import export_peft_lora, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from .inject import AdapterReport, adapter_config_of, adapter_parameters, apply_adapter

__all__ = [
    "AdapterConfig", "AdapterMethod", "AdapterLinear", "AdapterReport", "EffiLoRAConfig", "EffiLoRALinear",
    "HydraLoRAConfig", "HydraLoRALinear", "LilyConfig", "LilyLinear", "LoRAConfig", "LoRALinear",
    "adapter_config_of", "adapter_parameters", "apply_adapter", "export_peft_lora",
    "is_adapter_param", "load_adapter", "merge_adapter", "method_of", "param_group", "register_method",
    "registered_methods", "save_adapter", "unmerge_adapter",
]
