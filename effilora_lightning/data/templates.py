"""The old import path of ``commonsense_prompts`` (the Alpaca prompt and answer extraction of the commonsense
tasks). Nothing in this package imports it any more; it stays because the layout in the design notes names
``data/templates.py`` and users' code may import from it. New code imports
``effilora_lightning.data.commonsense_prompts``."""

from effilora_lightning.data.commonsense_prompts import (
    ANSWER_PATTERNS,
    RESPONSE_MARKER,
    TASKS,
    build_eval_prompt,
    build_train_prompt,
    extract_answer,
    response_text,
)

__all__ = ["ANSWER_PATTERNS", "RESPONSE_MARKER", "TASKS", "build_eval_prompt", "build_train_prompt", "extract_answer",
           "response_text"]
