"""Prompt strings byte for byte, and answer extraction as the LLM-Adapters evaluation script does it."""

from __future__ import annotations

import pytest

from effilora_lightning.data.commonsense_prompts import (
    ANSWER_PATTERNS,
    TASKS,
    build_eval_prompt,
    build_train_prompt,
    extract_answer,
    response_text,
)

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
SIXTEEN = " " * 16


def test_tasks_are_the_eight_llm_adapters_directories() -> None:
    assert TASKS == ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy",
                     "openbookqa")
    assert set(ANSWER_PATTERNS) == set(TASKS)


def test_clean_train_prompt() -> None:
    text = build_train_prompt("Q?", "the correct answer is true")
    assert text == PREAMBLE + "\n\n### Instruction:\nQ?\n\n### Response:\nthe correct answer is true"


def test_clean_eval_prompt_is_the_train_prompt_without_output() -> None:
    assert build_eval_prompt("Q?") == PREAMBLE + "\n\n### Instruction:\nQ?\n\n### Response:\n"
    assert build_train_prompt("Q?", "xyz").startswith(build_eval_prompt("Q?"))


def test_reference_train_prompt_reproduces_finetune_py_whitespace() -> None:
    expected = (PREAMBLE + "  \n\n" + SIXTEEN + "### Instruction:\n" + SIXTEEN + "Q?\n" + SIXTEEN + "\n"
                + SIXTEEN + "### Response:\n" + SIXTEEN + "out")
    assert build_train_prompt("Q?", "out", reference_whitespace=True) == expected


def test_reference_eval_prompt_reproduces_commonsense_evaluate_py_whitespace() -> None:
    expected = (PREAMBLE + " \n\n" + SIXTEEN + "### Instruction:\n" + SIXTEEN + "Q?\n\n"
                + SIXTEEN + "### Response:\n" + SIXTEEN)
    assert build_eval_prompt("Q?", reference_whitespace=True) == expected
    # the reference's evaluation prompt is NOT a prefix of its training text (one reason the clean one is default)
    assert not build_train_prompt("Q?", "x", reference_whitespace=True).startswith(expected)


def test_extract_takes_first_match_after_the_response_marker() -> None:
    generated = build_eval_prompt("answer4 is in the question") + "the correct answer is answer2, not answer3"
    assert extract_answer("ARC-Easy", generated) == "answer2"


def test_extract_on_new_tokens_only() -> None:
    assert extract_answer("boolq", " the correct answer is false") == "false"
    assert extract_answer("piqa", "solution2 solution1") == "solution2"
    assert extract_answer("hellaswag", "ending3") == "ending3"
    assert extract_answer("winogrande", "option1") == "option1"
    assert extract_answer("social_i_qa", "answer3") == "answer3"


def test_extract_ignores_text_after_a_second_marker_like_split_1() -> None:
    assert extract_answer("boolq", "### Response: nothing here ### Response: true") is None
    assert response_text("a ### Response:  b  ### Response: c") == "b"


def test_extract_is_case_sensitive_without_word_boundaries_like_the_reference() -> None:
    assert extract_answer("boolq", "True") is None
    assert extract_answer("boolq", "it is untrue") == "true"
    assert extract_answer("ARC-Challenge", "Answer1") is None


def test_extract_regex_per_task() -> None:
    assert extract_answer("openbookqa", "answer5") == "answer5"  # the reference groups openbookqa with ARC
    assert extract_answer("hellaswag", "ending5 ending2") == "ending2"
    assert extract_answer("piqa", "solution3") is None
    assert extract_answer("winogrande", "option3 option2") == "option2"


def test_no_match_is_none() -> None:
    assert extract_answer("boolq", "maybe") is None
    assert extract_answer("ARC-Easy", "") is None


def test_unknown_task_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown commonsense task 'gsm8k'.*boolq, piqa"):
        extract_answer("gsm8k", "x")


@pytest.mark.parametrize("reference_whitespace", [False, True])
@pytest.mark.parametrize(("task", "generation", "expected"), [
    ("ARC-Easy", "the correct answer is answer2\n\n### Response:\nthe correct answer is answer3", "answer2"),
    ("piqa", "the correct answer is solution2\n### Response:\n", "solution2"),
    ("boolq", "the correct answer is false\n\n### Instruction: is it?\n\n### Response:\nthe correct answer is true",
     "false"),
])
def test_answer_comes_from_the_segment_after_the_prompts_marker(task, generation, expected, reference_whitespace):
    """commonsense_evaluate.py: decode prompt + generation, split on the marker, take [1]; rambling base models
    write the marker again, and what follows it is not the answer."""
    text = build_eval_prompt("Which one?", reference_whitespace) + generation
    assert extract_answer(task, text) == expected
