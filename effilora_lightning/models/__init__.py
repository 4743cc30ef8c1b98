"""LightningModules: CausalLMModule (LLaMA-3) and VisionLanguageModule (LLaVA-style)."""

from .causal_lm import CausalLMModule, load_causal_lm
from .vision_language import LlavaModel, VisionLanguageModule

__all__ = ["CausalLMModule", "LlavaModel", "VisionLanguageModule", "load_causal_lm"]
