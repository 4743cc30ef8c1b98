"""Moved to ``effilora_lightning.distributed.checkpointing``; YAML recipes may keep
``class_path: effilora_lightning.strategies.AdapterModelParallelStrategy``."""

from .distributed.checkpointing import *  # noqa: F403
from .distributed.checkpointing import DCP_METADATA_FILE, LIGHTNING_META_FILE, MODEL_KEY, __all__  # noqa: F401
