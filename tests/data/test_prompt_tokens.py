"""PromptTokens: a clean commonsense prompt's ids as head + instruction + tail, tokenized apart only where that
is exactly the whole prompt's ids (LLaMA-3's pre-tokenizer and instruction edges that end a pre-token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken

from effilora_lightning.data.commonsense_examples import PromptTokens, drop_bos
from effilora_lightning.data.commonsense_prompts import build_train_prompt
from effilora_lightning.data.fast_bpe import pretokenizes_as_llama3
from effilora_lightning.data.tokenizer import encode_texts, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data/checkpoints/tiny-llama"

EDGES = ["<|begin_of_text|> spelled out", " starts with a space", "ends with a question?", "ends with a space ", "ends with a newline\n",
         "\nstarts with a newline", "<|eot_id|> opens it", "ends in a special <|eot_id|>", "digits 1234567",
         "accented é", "Ünïcode start", "x", "emoji 😀", "tab\tthen end\t", "(parenthesis)", "it's", "'s start",
         "Answer format: true/false", "two\n\nparagraphs end"]


def whole_ids(tokenizer, instructions: list[str]) -> list[list[int]]:
    return drop_bos(encode_texts(tokenizer, [build_train_prompt(i, "") for i in instructions]), tokenizer.bos_token_id)


def split_ids(prompts: PromptTokens, tokenizer, instructions: list[str]) -> list[list[int]]:
    texts = prompts.texts(instructions)
    return prompts.ids(instructions, texts, encode_texts(tokenizer, texts), bos=tokenizer.bos_token_id)


def bundled_instructions() -> list[str]:
    records = json.loads((ROOT / "data/datasets/commonsense/commonsense_170k.json").read_text())
    return [r["instruction"] for r in records[:400]]


def test_llama3_prompts_split_where_exact_and_give_the_whole_prompts_ids(llama3_tokenizer):
    prompts = PromptTokens(llama3_tokenizer, reference_whitespace=False)
    assert prompts.parts is not None
    instructions = bundled_instructions() + EDGES
    assert split_ids(prompts, llama3_tokenizer, instructions) == whole_ids(llama3_tokenizer, instructions)
    texts = prompts.texts(instructions)
    assert all(t is i for t, i in zip(texts[:400], instructions[:400]))  # every real instruction goes alone
    assert sum(t is i for t, i in zip(texts[400:], EDGES)) == 8  # the other 11 edge cases go whole


def test_the_edge_rule_is_what_keeps_it_exact(llama3_tokenizer):
    """Split regardless of the edges, an instruction ending in punctuation or whitespace gets other ids: the
    punctuation pre-token takes the template's newlines with it."""
    prompts = PromptTokens(llama3_tokenizer, reference_whitespace=False)
    head, tail = prompts.parts
    for instruction in ["ends with a question?", "ends with a space ", "\nstarts with a newline", "(parenthesis)"]:
        naive = head + encode_texts(llama3_tokenizer, [instruction])[0] + tail
        assert naive != whole_ids(llama3_tokenizer, [instruction])[0]


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
def test_the_tiny_models_tokenizer_splits_too():
    tokenizer = load_tokenizer(TINY)
    prompts = PromptTokens(tokenizer, reference_whitespace=False)
    instructions = bundled_instructions() + EDGES
    assert prompts.parts is not None
    assert split_ids(prompts, tokenizer, instructions) == whole_ids(tokenizer, instructions)


def test_other_tokenizers_and_the_reference_whitespace_tokenize_whole_prompts(sp_tokenizer, llama3_tokenizer):
    for prompts in [PromptTokens(sp_tokenizer, False), PromptTokens(llama3_tokenizer, True)]:
        assert prompts.parts is None
        assert prompts.texts(["Say hi"]) == [build_train_prompt("Say hi", "", prompts.reference_whitespace)]
    assert split_ids(PromptTokens(sp_tokenizer, False), sp_tokenizer, EDGES) == whole_ids(sp_tokenizer, EDGES)


def test_an_added_token_that_strips_whitespace_turns_the_split_off(llama3_tokenizer, tmp_path):
    llama3_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert pretokenizes_as_llama3(tokenizer)
    tokenizer.add_tokens([AddedToken("<stripper>", lstrip=True)])
    assert not pretokenizes_as_llama3(tokenizer)
    assert PromptTokens(tokenizer, False).parts is None
