"""The committed synthetic data: schema, instruction patterns, balanced labels, rule-correct answers,
bit-identical rebuilds, and a tiny-llama directory that loads like a LLaMA-3 checkpoint.

The slow pretraining in data/scripts/make_tiny_llama.py is never re-run here.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from effilora_lightning.data.commonsense_prompts import TASKS, extract_answer
from effilora_lightning.data.records import read_records

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "datasets" / "commonsense"
TINY_LLAMA = ROOT / "data" / "checkpoints" / "tiny-llama"

_CHOOSE = "Please choose the correct answer to the question: "
_FOUR = r"\n\nAnswer1: (.+) Answer2: (.+) Answer3: (.+) Answer4: (.+)\n\nAnswer format: answer1/answer2/answer3/answer4"
PATTERNS = {
    "boolq": r"Please answer the following question with true or false, question: (.+)\?\n\nAnswer format: true/false",
    "piqa": (r"Please choose the correct solution to the question: (.+)\n\nSolution1: (.+)\n\nSolution2: (.+)"
             r"\n\nAnswer format: solution1/solution2"),
    "social_i_qa": (_CHOOSE + r"(.+)\n\nAnswer1: (.+) Answer2: (.+) Answer3: (.+)\n\n"
                    r"Answer format: answer1/answer2/answer3"),
    "hellaswag": (r"Please choose the correct ending to complete the given sentence: ([^:\n]+): (.+)\n\n"
                  r"Ending1: (.+) Ending2: (.+) Ending3: (.+) Ending4: (.+)\n\n"
                  r"Answer format: ending1/ending2/ending3/ending4"),
    "winogrande": (r"Please choose the correct answer to fill in the blank to complete the given sentence: "
                   r"(.*_.*)\n\nOption1: (.+) Option2: (.+) Answer format: option1/option2"),
    "ARC-Challenge": _CHOOSE + "(.+)" + _FOUR,
    "ARC-Easy": _CHOOSE + "(.+)" + _FOUR,
    "openbookqa": _CHOOSE + "(.+)" + _FOUR,
}
LABELS = {
    "boolq": ["true", "false"], "piqa": ["solution1", "solution2"], "social_i_qa": ["answer1", "answer2", "answer3"],
    "hellaswag": [f"ending{i}" for i in range(1, 5)], "winogrande": ["option1", "option2"],
    "ARC-Challenge": [f"answer{i}" for i in range(1, 5)], "ARC-Easy": [f"answer{i}" for i in range(1, 5)],
    "openbookqa": [f"answer{i}" for i in range(1, 5)],
}


def load(path: Path) -> list[dict[str, str]]:
    """The file's records, read as the DataModules read them (``records.read_records``)."""
    records, skipped = read_records(path)
    assert skipped == 0
    return [record for _, record in records]


def task_of(instruction: str) -> str:
    """The task whose pattern the instruction matches (exactly one must match, ARC/openbookqa aside)."""
    matches = [t for t, p in PATTERNS.items() if re.fullmatch(p, instruction, flags=re.S)]
    assert matches, f"instruction matches no task pattern: {instruction!r}"
    return matches[0]


@pytest.fixture(scope="module")
def make_commonsense():
    spec = importlib.util.spec_from_file_location("make_commonsense", ROOT / "data" / "scripts" / "make_commonsense.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_commonsense", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tests() -> dict[str, list[dict[str, str]]]:
    return {task: load(DATA / "dataset" / task / "test.json") for task in TASKS}


@pytest.fixture(scope="module")
def train() -> list[dict[str, str]]:
    return load(DATA / "commonsense_170k.json")


# ---------------------------------------------------------------------------------------------- dataset


def test_every_record_has_the_llm_adapters_schema(train, tests) -> None:
    for record in train + [r for records in tests.values() for r in records]:
        assert set(record) == {"instruction", "input", "output", "answer"}
        assert record["input"] == ""
        assert record["output"] == f"the correct answer is {record['answer']}"


@pytest.mark.parametrize("task", TASKS)
def test_test_set_pattern_size_and_exact_label_balance(tests, task: str) -> None:
    records = tests[task]
    assert len(records) == 48
    for record in records:
        assert re.fullmatch(PATTERNS[task], record["instruction"], flags=re.S), record["instruction"]
        assert extract_answer(task, record["output"]) == record["answer"]
    counts = Counter(r["answer"] for r in records)
    assert counts == {label: 48 // len(LABELS[task]) for label in LABELS[task]}


@functools.cache
def _things(mc) -> dict:
    return {t.name: t for t in mc.build_world()}


@functools.cache
def _stem_regex(stem: str) -> str:
    """A stem template as a regex: {x} captures the thing, {p} matches a name."""
    return re.escape(stem).replace(r"\{x\}", r"(?P<x>\w+)").replace(r"\{p\}", r"\w+")


def parse(mc, record: dict[str, str]) -> tuple[str, tuple, tuple, str]:
    """(task, kind key, subject key, the answer the world's rules give) for one generated record."""
    text = record["instruction"]
    things = _things(mc)
    if text.startswith("Please answer the following question with true or false"):
        q = re.fullmatch(PATTERNS["boolq"], text, flags=re.S).group(1)
        (kind, name), = [(k, m.group("x")) for k in mc.KINDS["boolq"] for stem in k.stems
                         if (m := re.fullmatch(_stem_regex(stem), q))]
        return "boolq", ("boolq", kind.name), (name,), mc.label("boolq", kind.answer(things[name]))
    task = task_of(text)
    stem, *options = re.fullmatch(PATTERNS[task], text, flags=re.S).groups()
    if task == "hellaswag":
        stem, options = options[0], options[1:]
    (task, kind), = [(t, k) for t, kinds in mc.KINDS.items() for k in kinds if k.options == tuple(options)]
    if kind.about_people:
        person = mc.Person(*next((p, n, c) for p in mc.PEOPLE for c, needs in mc.NEEDS.items() for n in needs
                                 if f"{p} {n}." in stem))
        subject, key = person, (person.name, person.need)
    else:
        (name,) = [n for n in things if re.search(rf"\b{n}\b", stem)]
        subject, key = things[name], (name,)
    return task, (task, kind.name), key, mc.label(task, kind.answer(subject))


@pytest.fixture(scope="module")
def parsed(make_commonsense, train, tests) -> dict[str, list[tuple[str, tuple, tuple, str]]]:
    return {"train": [parse(make_commonsense, r) for r in train],
            "test": [parse(make_commonsense, r) for records in tests.values() for r in records]}


def test_every_answer_follows_the_rules_of_the_world(parsed, train, tests) -> None:
    records = train + [r for records in tests.values() for r in records]
    for record, (_, _, _, expected) in zip(records, parsed["train"] + parsed["test"], strict=True):
        assert expected == record["answer"], record["instruction"]


def test_training_file_has_every_task_with_balanced_labels(parsed, train) -> None:
    assert len(train) == 8 * 408
    assert Counter(task for task, *_ in parsed["train"]) == {task: 408 for task in TASKS}
    labels = Counter((task, r["answer"]) for (task, *_), r in zip(parsed["train"], train, strict=True))
    assert labels == {(task, label): 408 // len(LABELS[task]) for task in TASKS for label in LABELS[task]}


def test_test_subjects_are_never_asked_about_in_training(parsed, train, tests) -> None:
    """Held out per question kind: the fine-tuning data never asks that kind of question about them."""
    seen = {p[1:3] for p in parsed["train"]}
    held_out = [p[1:3] for p in parsed["test"]]
    assert not seen & set(held_out)
    instructions = [r["instruction"] for r in train] + [r["instruction"] for rs in tests.values() for r in rs]
    assert len(set(instructions)) == len(instructions) == 8 * (408 + 48)


def test_rebuild_is_bit_identical(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "data" / "scripts" / "make_commonsense.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert files == sorted(p.relative_to(DATA) for p in DATA.rglob("*.json"))
    assert len(files) == 9
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_dataset_is_small() -> None:
    assert sum(p.stat().st_size for p in DATA.rglob("*")) < 2 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- tiny-llama


def test_tiny_llama_config_is_llama3_like() -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TINY_LLAMA, local_files_only=True)
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.tie_word_embeddings is False
    assert 64 <= config.hidden_size <= 128 and 2 <= config.num_hidden_layers <= 4
    assert 1000 <= config.vocab_size <= 2000
    assert config.pad_token_id is None


def test_tiny_llama_tokenizer_mimics_llama3() -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA, local_files_only=True)
    config = AutoConfig.from_pretrained(TINY_LLAMA, local_files_only=True)
    assert len(tok) == config.vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", None)
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    vocab = tok.get_vocab()
    for special in ("<|reserved_special_token_0|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert special in vocab
    assert tok.eos_token_id == tok.bos_token_id + 1  # specials follow the regular vocabulary, bos first
    ids = tok("the correct answer is answer2").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["Ġanswer", "2"]  # digits split from letters as in LLaMA-3
    assert tok.decode(ids, skip_special_tokens=True) == "the correct answer is answer2"


def test_tiny_llama_model_loads_and_runs() -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(TINY_LLAMA / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, local_files_only=True)
    assert 0.2e6 < sum(p.numel() for p in model.parameters()) < 3e6
    logits = model(torch.tensor([[model.config.bos_token_id, 5, 6]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
