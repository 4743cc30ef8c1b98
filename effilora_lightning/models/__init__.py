"""LightningModules. FineTuneModule is task-agnostic (building, injecting, sharding, optimizer groups, schedule,
checkpoints, export); CausalLMModule (commonsense, LLaMA-3) and VisionLanguageModule (LLaVA-style) add their
batches and their evaluation (GenerationEvalModule)."""

from .causal_lm import CausalLMModule, load_causal_lm
from .evaluation import GenerationEvalModule
from .finetune import FineTuneModule
from .llava_model import LlavaModel
from .vision_language import VisionLanguageModule

__all__ = ["CausalLMModule", "FineTuneModule", "GenerationEvalModule", "LlavaModel", "VisionLanguageModule",
           "load_causal_lm"]
