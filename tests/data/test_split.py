"""The one seeded validation split: exact positions, and the same split in both DataModules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from byte_tokenizer import save_byte_tokenizer
from test_commonsense import TINY_LLAMA, rec
from test_visual_instruction import turn

from effilora_lightning.data import CommonsenseDataModule, VisualInstructionDataModule
from effilora_lightning.data.split import seeded_split


def test_split_is_a_seeded_shuffle_in_file_order():
    split = seeded_split(10, 3, seed=42)
    assert split == seeded_split(10, 3, seed=42)
    assert sorted(split.train + split.held_out) == list(range(10)) and len(split.held_out) == 3
    assert split.train == sorted(split.train) and split.held_out == sorted(split.held_out)
    assert split.held_out != seeded_split(10, 3, seed=7).held_out
    assert seeded_split(4, 0, seed=1) == ([0, 1, 2, 3], [])
    assert seeded_split(2, 5, seed=1) == ([], [0, 1])
    with pytest.raises(ValueError, match="counts >= 0"):
        seeded_split(3, -1, seed=0)


@pytest.mark.parametrize("seed", [3, 42])
def test_both_datamodules_hold_out_the_same_records_for_the_same_seed(tmp_path: Path, seed: int):
    n, held = 12, 4
    expected = seeded_split(n, held, seed).held_out
    # commonsense: record k asks about "thing k"; the validation rows say which records they are
    (tmp_path / "train.json").write_text(json.dumps([rec(f"is thing {k} red?") for k in range(n)]))
    (tmp_path / "dataset" / "boolq").mkdir(parents=True)
    (tmp_path / "dataset" / "boolq" / "test.json").write_text(json.dumps([rec("is the sky red?", "false")]))
    cs = CommonsenseDataModule(str(tmp_path / "train.json"), str(tmp_path / "dataset"), str(TINY_LLAMA),
                               eval_tasks=["boolq"], val_set_size=held, seed=seed, use_cache=False)
    cs.setup("fit")
    texts = [cs.tokenizer.decode(row["input_ids"]) for row in cs._val]
    assert [k for k in range(n) if any(f"thing {k} red" in t for t in texts)] == expected
    # visual instruction: the validation samples' ids are their record indices
    (tmp_path / "llava.json").write_text(json.dumps([{"id": f"s{k}", "conversations": turn("Hi", "hi")}
                                                     for k in range(n)]))
    save_byte_tokenizer(tmp_path / "tok")
    vi = VisualInstructionDataModule(str(tmp_path / "llava.json"), str(tmp_path), str(tmp_path / "tok"),
                                     template="llama3", image_size=16, val_set_size=held, seed=seed,
                                     use_cache=False)
    vi.setup("fit")
    assert vi.datasets["val"].sample_ids == expected
    assert vi.datasets["train"].sample_ids == seeded_split(n, held, seed).train
