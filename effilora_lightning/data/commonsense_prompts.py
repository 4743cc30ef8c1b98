"""Alpaca prompts and answer extraction for the commonsense-reasoning tasks (LLM-Adapters layout).

Everything here is a pure function of strings, so the DataModule, the LightningModule and offline
scripts all build byte-identical prompts and score answers the same way.

Prompt (no-input Alpaca branch). The clean template, used by default for training and evaluation::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:
    {output}

``reference_whitespace=True`` reproduces the LLM-Adapters scripts byte for byte, stray indentation from
their triple-quoted f-strings included. Their training prompt (``finetune.py``) and their evaluation
prompt (``commonsense_evaluate.py``) differ from each other: two trailing spaces after "request." and a
16-space blank line in training, one trailing space and an empty blank line in evaluation, and every
line after the first indented by 16 spaces in both.

Answer extraction follows ``commonsense_evaluate.py``: take the text after "### Response:" (up to a
second "### Response:" if the model writes one, as ``str.split(...)[1]`` does), strip it, and return the
FIRST match of the task's regex. Matching is case-SENSITIVE and has no word boundaries, as in the
reference ("True" does not match boolq; "untrue" matches "true"). openbookqa uses the reference's
``answer1..answer5`` pattern (the reference groups it with ARC and social_i_qa).
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWER_PATTERNS",
    "RESPONSE_MARKER",
    "TASKS",
    "build_eval_prompt",
    "build_train_prompt",
    "extract_answer",
    "response_text",
]

TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
"""The 8 task directory names under ``dataset/``, in the order results are reported."""

RESPONSE_MARKER = "### Response:"

_MULTI_CHOICE = r"answer1|answer2|answer3|answer4|answer5"

ANSWER_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": re.compile(_MULTI_CHOICE),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "ARC-Challenge": re.compile(_MULTI_CHOICE),
    "ARC-Easy": re.compile(_MULTI_CHOICE),
    "openbookqa": re.compile(_MULTI_CHOICE),
}
"""Per-task answer regex, exactly as in the reference evaluation script (case-sensitive)."""

_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_INDENT = " " * 16


def build_train_prompt(instruction: str, output: str, reference_whitespace: bool = False) -> str:
    """Return the full training text: the prompt followed by the target ``output``.

    With ``reference_whitespace`` the text matches LLM-Adapters ``finetune.py`` exactly.
    """
    if reference_whitespace:
        return (
            f"{_PREAMBLE}  \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
            f"{_INDENT}{RESPONSE_MARKER}\n{_INDENT}{output}"
        )
    return f"{_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}\n{output}"


def build_eval_prompt(instruction: str, reference_whitespace: bool = False) -> str:
    """Return the generation prompt (everything up to where the model starts writing).

    The clean prompt is the training text with an empty output, so the model sees at evaluation
    exactly the token prefix it was trained on. With ``reference_whitespace`` the text matches
    LLM-Adapters ``commonsense_evaluate.py`` exactly, which is NOT a prefix of its training text.
    """
    if reference_whitespace:
        return (
            f"{_PREAMBLE} \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
            f"{_INDENT}{RESPONSE_MARKER}\n{_INDENT}"
        )
    return build_train_prompt(instruction, "", reference_whitespace=False)


def response_text(generated_text: str) -> str:
    """Return the stripped text after the first "### Response:" (whole text when the marker is absent).

    Decoded generations that include the prompt contain the marker; decoded new tokens alone usually
    do not, and are then taken whole. Text after a second marker is dropped, as the reference does.
    """
    if RESPONSE_MARKER in generated_text:
        generated_text = generated_text.split(RESPONSE_MARKER)[1]
    return generated_text.strip()


def extract_answer(task: str, generated_text: str) -> str | None:
    """Return the first answer label of ``task`` found in the response, or None when there is none.

    Raises:
        KeyError: ``task`` is not one of ``TASKS``; the message lists the valid names.
    """
    if task not in ANSWER_PATTERNS:
        raise KeyError(f"unknown commonsense task {task!r}; valid tasks: {', '.join(TASKS)}")
    match = ANSWER_PATTERNS[task].search(response_text(generated_text))
    return match.group(0) if match else None
