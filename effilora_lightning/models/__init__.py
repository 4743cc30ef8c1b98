"""LightningModules: CausalLMModule (LLaMA-3) and VisionLanguageModule (LLaVA-style)."""

from .causal_lm import CausalLMModule, load_causal_lm

__all__ = ["CausalLMModule", "load_causal_lm"]
