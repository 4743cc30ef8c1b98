"""LightningDataModules and the prompt/tokenizer helpers they share."""

from effilora_lightning.data.commonsense import CommonsenseDataModule
from effilora_lightning.data.visual_instruction import VisualInstructionDataModule

__all__ = ["CommonsenseDataModule", "VisualInstructionDataModule"]
