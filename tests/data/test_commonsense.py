"""CommonsenseDataModule on hand-written records: masking, BOS/EOS, padding, truncation, splits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effilora_lightning.data import CommonsenseDataModule
from effilora_lightning.data.commonsense import SAMPLE_ID_STRIDE, RecordError, is_generation_batch
from effilora_lightning.data.commonsense_prompts import TASKS, build_eval_prompt, build_train_prompt
from effilora_lightning.data.tokenizer import load_tokenizer

TINY_LLAMA = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "tiny-llama"


def rec(instruction: str, answer: str = "true", output: str | None = None) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output or f"the correct answer is {answer}",
            "answer": answer}


TRAIN = [rec("is the apple red?"), rec("is the car blue?", "false"), rec("is the hat small?"),
         rec("is the dog big?", "false"), rec("is the drum green?")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA)


def write(path: Path, records: list, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


def layout(tmp_path: Path, train: list | None = None, tests: dict[str, list] | None = None) -> dict[str, str]:
    """Training file plus dataset/<task>/test.json; returns the DataModule path arguments."""
    write(tmp_path / "train.json", TRAIN if train is None else train)
    default = {"boolq": [rec("is the cat white?"), rec("is the bus red?", "false")],
               "piqa": [rec("goal\n\nSolution1: a\n\nSolution2: b", "solution2")]}
    for task, records in (default if tests is None else tests).items():
        write(tmp_path / "dataset" / task / "test.json", records)
    return {"data_path": str(tmp_path / "train.json"), "dataset_dir": str(tmp_path / "dataset"),
            "tokenizer_path": str(TINY_LLAMA)}


def module(tmp_path: Path, stage: str = "fit", **kwargs) -> CommonsenseDataModule:
    paths = layout(tmp_path, kwargs.pop("train", None), kwargs.pop("tests", None))
    kwargs.setdefault("eval_tasks", ["boolq", "piqa"])
    dm = CommonsenseDataModule(**paths, **kwargs)
    dm.setup(stage)
    return dm


def expected_ids(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, output ids with EOS), computed independently of the module."""
    prompt = tokenizer(build_train_prompt(record["instruction"], ""), add_special_tokens=False).input_ids
    output = tokenizer(record["output"], add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *prompt], [*output, tokenizer.eos_token_id]


def first_train_batch(dm: CommonsenseDataModule) -> dict[str, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------------------------- sequences


def test_train_on_inputs_masks_only_padding(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, train=TRAIN[:1], batch_size=1)
    batch = first_train_batch(dm)
    prompt, output = expected_ids(tokenizer, TRAIN[0])
    assert batch["input_ids"][0].tolist() == prompt + output
    assert batch["labels"][0].tolist() == prompt + output
    assert batch["attention_mask"][0].tolist() == [1] * len(prompt + output)


def test_masking_the_prompt_labels_exactly_output_and_eos(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, train=TRAIN[:1], batch_size=1, train_on_inputs=False)
    batch = first_train_batch(dm)
    prompt, output = expected_ids(tokenizer, TRAIN[0])
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + output
    assert tokenizer.decode(output[:-1]) == "the correct answer is true"


def test_single_bos_and_eos_at_the_end(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, batch_size=5)
    batch = first_train_batch(dm)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_right_padding_uses_pad_id_and_labels_minus_100(tmp_path: Path, tokenizer) -> None:
    records = [rec("short?"), rec("a much longer question with many more words in it?")]
    dm = module(tmp_path, train=records, batch_size=2)
    batch = first_train_batch(dm)
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    n = int(lengths[short])
    assert int(lengths.max()) > n
    assert batch["attention_mask"][short, :n].all() and not batch["attention_mask"][short, n:].any()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n:] == -100).all()
    assert tokenizer.pad_token_id != 0  # id 0 is a real token in LLaMA-3 vocabularies


def test_truncation_drops_eos_and_is_counted(tmp_path: Path, tokenizer) -> None:
    prompt, output = expected_ids(tokenizer, TRAIN[0])
    cutoff = len(prompt) + 2
    with pytest.warns(UserWarning, match="training sequences were cut"):
        dm = module(tmp_path, train=TRAIN[:1], batch_size=1, cutoff_len=cutoff)
    batch = first_train_batch(dm)
    assert batch["input_ids"][0].tolist() == (prompt + output)[:cutoff]
    assert tokenizer.eos_token_id not in batch["input_ids"][0].tolist()
    assert dm.num_truncated_train == 1


def test_sequence_exactly_at_cutoff_keeps_eos(tmp_path: Path, tokenizer) -> None:
    prompt, output = expected_ids(tokenizer, TRAIN[0])
    dm = module(tmp_path, train=TRAIN[:1], batch_size=1, cutoff_len=len(prompt + output))
    assert first_train_batch(dm)["input_ids"][0].tolist()[-1] == tokenizer.eos_token_id
    assert dm.num_truncated_train == 0


def test_prompt_filling_cutoff_with_masked_inputs_is_dropped_and_counted(tmp_path: Path, tokenizer) -> None:
    prompt, _ = expected_ids(tokenizer, TRAIN[0])
    long = rec("word " * 200)
    with pytest.warns(UserWarning, match="dropped 1 training sequences"):
        dm = module(tmp_path, train=[TRAIN[0], long], batch_size=4, train_on_inputs=False,
                    cutoff_len=len(prompt) + 12)
    assert dm.num_fully_masked == 1
    assert first_train_batch(dm)["input_ids"].shape[0] == 1


def test_no_eos_when_add_eos_is_false(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, train=TRAIN[:1], batch_size=1, add_eos=False)
    prompt, output = expected_ids(tokenizer, TRAIN[0])
    assert first_train_batch(dm)["input_ids"][0].tolist() == prompt + output[:-1]


def test_reference_whitespace_changes_the_prompt(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, train=TRAIN[:1], batch_size=1, reference_whitespace=True)
    text = tokenizer.decode(first_train_batch(dm)["input_ids"][0], skip_special_tokens=True)
    assert text == build_train_prompt(TRAIN[0]["instruction"], TRAIN[0]["output"], reference_whitespace=True)


# ---------------------------------------------------------------------------------------------- generation


def test_generation_batches_are_left_padded_prompts(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path, stage="test", eval_batch_size=8)
    batches = list(dm.test_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "task", "answer", "sample_id"}
    assert is_generation_batch(batch)
    assert batch["task"] == ["boolq", "boolq", "piqa"]
    assert batch["answer"] == ["true", "false", "solution2"]
    assert batch["sample_id"].tolist() == [0, 1, TASKS.index("piqa") * SAMPLE_ID_STRIDE]
    assert batch["sample_id"].dtype == torch.long
    for row, mask, instruction in zip(batch["input_ids"], batch["attention_mask"],
                                      ["is the cat white?", "is the bus red?"]):
        n = int(mask.sum())
        assert not mask[: len(mask) - n].any() and mask[len(mask) - n:].all()  # padding on the left
        assert (row[: len(mask) - n] == tokenizer.pad_token_id).all()
        prompt = tokenizer(build_eval_prompt(instruction), add_special_tokens=False).input_ids
        assert row[len(mask) - n:].tolist() == [tokenizer.bos_token_id, *prompt]


def test_long_generation_prompt_is_kept_whole(tmp_path: Path, tokenizer) -> None:
    tests = {"boolq": [rec("word " * 100 + "is it?"), rec("is it?")]}
    dm = module(tmp_path, stage="test", tests=tests, eval_tasks=["boolq"], cutoff_len=32)  # cutoff: training only
    ids = next(iter(dm.test_dataloader()))["input_ids"][0].tolist()
    full = tokenizer(build_eval_prompt("word " * 100 + "is it?"), add_special_tokens=False).input_ids
    assert ids == [tokenizer.bos_token_id, *full]  # the reference never cuts an eval prompt
    assert dm.longest_eval_prompt == (1 + len(full), "boolq", 0)


def test_max_eval_prompt_len_refuses_naming_task_and_record(tmp_path: Path, tokenizer) -> None:
    tests = {"boolq": [rec("is it?"), rec("word " * 100 + "is it?")]}
    with pytest.raises(RecordError, match=r"boolq/test\.json: record 1 \(eval task boolq\) is a \d+-token prompt, "
                                          r"longer than max_eval_prompt_len=64"):
        module(tmp_path, stage="test", tests=tests, eval_tasks=["boolq"], max_eval_prompt_len=64)
    with pytest.raises(ValueError, match="max_eval_prompt_len must be >= 1"):
        module(tmp_path, stage="test", max_eval_prompt_len=0)


def test_reference_whitespace_ids_are_the_whole_string_s(tmp_path: Path, llama3_tokenizer) -> None:
    """LLM-Adapters tokenizes prompt + output at once; apart, the boundary differs with LLaMA-3's BPE."""
    instruction = "Please answer the following question with true or false, question: is the sky blue?"
    record = rec(instruction, "true")
    llama3_tokenizer.save_pretrained(tmp_path / "llama3")
    paths = layout(tmp_path, train=[record]) | {"tokenizer_path": str(tmp_path / "llama3")}
    text = build_train_prompt(instruction, record["output"], reference_whitespace=True)
    prompt = build_train_prompt(instruction, "", reference_whitespace=True)
    whole = llama3_tokenizer(text).input_ids  # with BOS, as finetune.py's tokenize() does
    apart = llama3_tokenizer(prompt).input_ids + llama3_tokenizer(record["output"], add_special_tokens=False).input_ids
    tokens = llama3_tokenizer.convert_ids_to_tokens(whole)
    assert whole != apart and tokens[len(tokens) - 1 - tokens[::-1].index("Ġthe") - 2:][:3] == [":Ċ", "Ġ" * 15, "Ġthe"]  # apart: 16 sp, "the"
    eos = llama3_tokenizer.eos_token_id
    for train_on_inputs in (True, False):
        dm = CommonsenseDataModule(**paths, eval_tasks=["boolq", "piqa"], batch_size=1, reference_whitespace=True,
                                   train_on_inputs=train_on_inputs)
        dm.setup("fit")
        batch = first_train_batch(dm)
        assert batch["input_ids"][0].tolist() == whole + [eos]
        masked = len(llama3_tokenizer(prompt).input_ids)  # the reference masks len(tokenize(prompt)) positions
        labels = whole + [eos] if train_on_inputs else [-100] * masked + (whole + [eos])[masked:]
        assert batch["labels"][0].tolist() == labels


def test_max_test_samples_per_task(tmp_path: Path) -> None:
    dm = module(tmp_path, stage="test", max_test_samples_per_task=1)
    batch = next(iter(dm.test_dataloader()))
    assert batch["task"] == ["boolq", "piqa"]


def test_val_dataloader_is_loss_then_capped_generation(tmp_path: Path) -> None:
    dm = module(tmp_path, val_set_size=2, val_generation_samples_per_task=1)
    loss_loader, gen_loader = dm.val_dataloader()
    loss_batch = next(iter(loss_loader))
    assert not is_generation_batch(loss_batch) and set(loss_batch) == {"input_ids", "attention_mask", "labels"}
    assert loss_batch["input_ids"].shape[0] == 2
    gen_batches = list(gen_loader)
    assert [t for b in gen_batches for t in b["task"]] == ["boolq", "piqa"]
    assert all(is_generation_batch(b) for b in gen_batches)


def test_val_dataloader_without_split_is_generation_only(tmp_path: Path) -> None:
    loaders = module(tmp_path, val_set_size=0).val_dataloader()
    assert len(loaders) == 1 and is_generation_batch(next(iter(loaders[0])))
    assert module(tmp_path, val_set_size=0, val_generation_samples_per_task=0).val_dataloader() == []


def test_val_split_is_seeded_and_disjoint(tmp_path: Path, tokenizer) -> None:
    def split(seed: int) -> tuple[set[str], set[str]]:
        dm = module(tmp_path, val_set_size=2, seed=seed, batch_size=16)
        texts = [tokenizer.decode(b["input_ids"][i], skip_special_tokens=True)
                 for loader in (dm.train_dataloader(), dm.val_dataloader()[0]) for b in loader
                 for i in range(b["input_ids"].shape[0])]
        return set(texts[:3]), set(texts[3:])

    train, val = split(0)
    assert len(train) == 3 and len(val) == 2 and not train & val
    assert split(0) == (train, val)
    assert any(split(seed)[1] != val for seed in range(1, 6))


def test_train_shuffle_is_seeded(tmp_path: Path) -> None:
    def order(seed: int) -> list[list[int]]:
        return first_train_batch(module(tmp_path, batch_size=5, seed=seed))["input_ids"].tolist()

    assert order(3) == order(3)
    assert any(order(s) != order(3) for s in range(4, 9))


def test_json_lines_training_file(tmp_path: Path, tokenizer) -> None:
    layout(tmp_path)
    write(tmp_path / "train.jsonl", TRAIN, jsonl=True)
    dm = CommonsenseDataModule(str(tmp_path / "train.jsonl"), str(tmp_path / "dataset"), str(TINY_LLAMA),
                               eval_tasks=["boolq"], batch_size=8)
    dm.setup("fit")
    assert first_train_batch(dm)["input_ids"].shape[0] == 5
    assert dm.tokenizer.pad_token_id == tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------- errors


def test_missing_answer_names_file_record_and_field(tmp_path: Path) -> None:
    bad = [TRAIN[0], {"instruction": "q", "input": "", "output": "the correct answer is true"}]
    with pytest.raises(RecordError, match=r"train\.json: record 1: field 'answer' is missing"):
        module(tmp_path, train=bad)


def test_wrong_field_type_names_the_field(tmp_path: Path) -> None:
    bad = [TRAIN[0], TRAIN[1], {**TRAIN[2], "output": 3}]
    with pytest.raises(RecordError, match=r"record 2: field 'output' must be a non-empty string, got 3"):
        module(tmp_path, train=bad)


def test_non_object_record(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"record 0: is a list, expected a JSON object"):
        module(tmp_path, train=[["not", "a", "record"]])


def test_nonempty_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"record 0: field 'input' is not empty"):
        module(tmp_path, train=[{**TRAIN[0], "input": "context"}])


def test_test_answer_must_be_a_label_of_its_task(tmp_path: Path) -> None:
    tests = {"boolq": [rec("q1"), rec("q2", "yes")]}
    with pytest.raises(RecordError, match=r"boolq/test\.json: record 1: field 'answer' is 'yes', not a label"):
        module(tmp_path, stage="test", tests=tests, eval_tasks=["boolq"])


def test_malformed_json_list_names_file_and_line(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    Path(paths["data_path"]).write_text('[\n{"instruction": "q",\n oops}\n]')
    dm = CommonsenseDataModule(**paths, eval_tasks=["boolq"])
    with pytest.raises(RecordError, match=r"train\.json: not valid JSON \(line 3, column 2"):
        dm.setup("fit")


def test_malformed_json_lines_error_and_skip(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    lines = [json.dumps(TRAIN[0]), "{broken", json.dumps(TRAIN[1]), json.dumps({"instruction": "no output"})]
    Path(paths["data_path"]).write_text("\n".join(lines))
    with pytest.raises(RecordError, match=r"train\.json: record 1 \(line 2\) is not valid JSON"):
        CommonsenseDataModule(**paths, eval_tasks=["boolq"]).setup("fit")
    dm = CommonsenseDataModule(**paths, eval_tasks=["boolq"], on_bad_record="skip", batch_size=8)
    with pytest.warns(UserWarning, match="skipped 2 malformed records"):
        dm.setup("fit")
    assert dm.num_skipped == {paths["data_path"]: 2}
    assert first_train_batch(dm)["input_ids"].shape[0] == 2


def test_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"train\.json: no usable records \(0 read, 0 skipped\)"):
        module(tmp_path, train=[])


def test_all_records_skipped_is_empty(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"no usable records \(1 read, 1 skipped\)"):
        module(tmp_path, train=[{"instruction": "q"}], on_bad_record="skip")


def test_val_set_size_too_large(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_set_size=5 leaves no training records: .* has 5 usable records"):
        module(tmp_path, val_set_size=5)


def test_unknown_eval_task_lists_valid_ones(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    with pytest.raises(ValueError, match=r"unknown eval_tasks \['gsm8k'\]; valid tasks: boolq, piqa, social_i_qa"):
        CommonsenseDataModule(**paths, eval_tasks=["boolq", "gsm8k"])


def test_missing_task_directory_names_path(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    dm = CommonsenseDataModule(**paths, eval_tasks=["boolq", "hellaswag"])
    with pytest.raises(FileNotFoundError, match=rf"eval task 'hellaswag': directory {tmp_path}/dataset/hellaswag"):
        dm.setup("test")


def test_missing_training_file(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    dm = CommonsenseDataModule(**{**paths, "data_path": str(tmp_path / "nope.json")}, eval_tasks=["boolq"])
    with pytest.raises(FileNotFoundError, match=rf"data file {tmp_path}/nope\.json does not exist"):
        dm.setup("fit")


def test_invalid_arguments(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    with pytest.raises(ValueError, match="cutoff_len must be >= 1, got 0"):
        CommonsenseDataModule(**paths, cutoff_len=0)
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip', got 'ignore'"):
        CommonsenseDataModule(**paths, on_bad_record="ignore")
    with pytest.raises(ValueError, match="val_set_size must be >= 0, got -1"):
        CommonsenseDataModule(**paths, val_set_size=-1)


def test_dataloader_before_setup(tmp_path: Path) -> None:
    dm = CommonsenseDataModule(**layout(tmp_path))
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\)"):
        dm.train_dataloader()


def test_default_eval_tasks_are_all_eight_and_state_dict_is_empty(tmp_path: Path) -> None:
    dm = CommonsenseDataModule(**layout(tmp_path))
    assert dm.eval_tasks == list(TASKS)
    assert dm.state_dict() == {}


def test_length_grouped_batches_cut_padding_and_cover_every_record_once(tmp_path: Path) -> None:
    train = [rec("is it " + "very " * (i * 7 % 40) + "red?") for i in range(64)]
    plain = module(tmp_path / "plain", train=train, batch_size=4)
    grouped = module(tmp_path / "grouped", train=train, batch_size=4, group_by_length=True, length_group_batches=4)

    def padding(dm: CommonsenseDataModule) -> tuple[float, list[int]]:
        batches = list(dm.train_dataloader())
        masks = torch.cat([b["attention_mask"].flatten() for b in batches])
        seen = sorted(tuple(row[m.bool()].tolist()) for b in batches for row, m in zip(b["input_ids"],
                                                                                    b["attention_mask"]))
        return 1 - masks.float().mean().item(), seen

    (plain_pad, plain_seen), (grouped_pad, grouped_seen) = padding(plain), padding(grouped)
    assert grouped_seen == plain_seen  # the same 64 examples, each once
    assert grouped_pad < plain_pad / 2, (grouped_pad, plain_pad)  # here 10 % vs 30 %
    sampler = grouped.train_dataloader().sampler
    assert sampler.window == 16 and list(sampler) == list(grouped.train_dataloader().sampler)  # seeded
