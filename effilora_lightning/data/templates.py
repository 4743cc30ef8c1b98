"""The old import path of ``commonsense_prompts`` (the Alpaca prompt and answer extraction of the commonsense
tasks). Kept because code outside the data package imports it from here: ``metrics`` (TASKS), the models and
their tests (TASKS, extract_answer). New code imports ``effilora_lightning.data.commonsense_prompts``."""

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
