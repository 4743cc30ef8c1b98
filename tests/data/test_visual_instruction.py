"""VisualInstructionDataModule: mixed batches, pad vs resize, bad records, mismatches, grouping sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from byte_tokenizer import save_byte_tokenizer
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch.utils.data import DistributedSampler

from effilora_lightning.data.batch import is_generation_batch
from effilora_lightning.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from effilora_lightning.data.visual_instruction import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BadRecordError,
    ModalityLengthGroupedSampler,
    VisualInstructionDataModule,
    preprocess_image,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16
RED = (255, 0, 0)


def turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two image samples (one non-square) and a text-only one in between; a byte tokenizer next to them."""
    Image.new("RGB", (SIZE, SIZE), RED).save(tmp_path / "a.png")
    Image.new("RGB", (SIZE * 2, SIZE), RED).save(tmp_path / "wide.png")
    records = [
        {"id": "img-a", "image": "a.png", "conversations": turn("<image>\nColor?", "red")},
        {"id": "txt-b", "conversations": turn("Say hi", "hi") + turn("Again", "hi hi")},
        {"id": "img-c", "image": "wide.png", "conversations": turn("Shape?\n<image>", "rectangle")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    save_byte_tokenizer(tmp_path / "tok")
    return tmp_path


def module(root: Path, data: str = "train.json", **kw) -> VisualInstructionDataModule:
    args = {"image_size": SIZE, "template": "llama3", "system_prompt": "", "val_data_path": str(root / data)} | kw
    dm = VisualInstructionDataModule(str(root / data), str(root), str(root / "tok"), **args)
    dm.setup("fit")
    return dm


def test_text_only_sample_shares_a_batch_with_image_samples(dataset):
    dm = module(dataset)
    batch = next(iter(dm.val_dataloader()))  # file order: img-a, txt-b, img-c
    assert batch["sample_name"] == ["img-a", "txt-b", "img-c"]
    assert batch["images"].shape == (2, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["image_counts"].tolist() == [1, 0, 1]
    assert ((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(dim=1)).tolist() == [1, 0, 1]
    lengths = batch["attention_mask"].sum(dim=1)
    longest = int(lengths.max())
    assert batch["input_ids"].shape == batch["labels"].shape == (3, longest)
    for row, n in enumerate(lengths.tolist()):  # right padding: pad id after the tokens, labels -100 there
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == dm.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert dm.tokenizer.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]) == "hi<|eot_id|>hi hi<|eot_id|>"


def test_sample_ids_are_record_indices_unique_across_the_file(dataset):
    dm = module(dataset)
    batch = next(iter(dm.val_dataloader()))
    assert batch["sample_id"].tolist() == [0, 1, 2] and batch["sample_id"].dtype == torch.long
    assert batch["task"] == ["vqa"] * 3
    assert is_generation_batch(batch)
    assert not is_generation_batch(next(iter(dm.train_dataloader())))
    # a bad record in the middle is skipped: the ids stay the records' indices in the file, each once
    records = json.loads((dataset / "train.json").read_text())
    many = [dict(r, id=f"{r['id']}-{k}") for k in range(40) for r in records]
    many[5] = {"id": "broken", "conversations": []}
    (dataset / "many.json").write_text(json.dumps(many))
    dm = module(dataset, "many.json", on_bad_record="skip", eval_batch_size=7)
    ids = [i for b in dm.val_dataloader() for i in b["sample_id"].tolist()]
    assert ids == [i for i in range(len(many)) if i != 5]
    assert [n for b in dm.val_dataloader() for n in b["sample_name"]] == [many[i]["id"] for i in ids]


def test_generation_batch_is_left_padded_prompt_and_answer(dataset):
    dm = module(dataset)
    batch = next(iter(dm.val_dataloader()))
    assert batch["answer"] == ["red", "hi hi", "rectangle"]
    header = [258] + list(b"assistant") + [259] + list(b"\n\n")
    for row, ids in enumerate(batch["prompt_input_ids"]):
        n = int(batch["prompt_attention_mask"][row].sum())
        assert ids[-len(header):].tolist() == header  # every prompt ends where the reply starts
        assert (ids[: len(ids) - n] == dm.tokenizer.pad_token_id).all()
        assert batch["prompt_attention_mask"][row, -n:].all() and not batch["prompt_attention_mask"][row, :-n].any()
        full = batch["input_ids"][row, :n]  # the prompt is the prefix of the full conversation
        assert torch.equal(full, ids[len(ids) - n:])


def test_pad_fills_with_the_mean_colour_and_resize_squashes():
    wide = Image.new("RGB", (40, 20), RED)
    pad = preprocess_image(wide, 20, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")
    squash = preprocess_image(wide, 20, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "resize")
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    mean_fill = (torch.tensor([round(255 * m) / 255 for m in OPENAI_CLIP_MEAN]) - torch.tensor(OPENAI_CLIP_MEAN)) \
        / torch.tensor(OPENAI_CLIP_STD)
    assert pad.shape == squash.shape == (3, 20, 20)
    assert torch.allclose(pad[:, 0, 10], mean_fill, atol=1e-6)  # top row: padding, ~0 after normalising
    assert torch.allclose(pad[:, 10, 10], red, atol=1e-5)  # centre: the image
    assert torch.allclose(pad[:, 2, 10], mean_fill, atol=1e-6) and torch.allclose(pad[:, 7, 10], red, atol=1e-5)
    assert torch.allclose(squash, red.view(3, 1, 1).expand(3, 20, 20), atol=1e-5)  # no padding anywhere


def test_missing_image_error_names_sample_and_path(dataset):
    records = json.loads((dataset / "train.json").read_text())
    records[2]["image"] = "gone/missing.png"
    (dataset / "broken.json").write_text(json.dumps(records))
    with pytest.raises(BadRecordError, match=r"sample 'img-c': image not found: .*gone/missing\.png"):
        module(dataset, "broken.json")


def test_skip_mode_drops_and_counts_each_kind(dataset):
    (dataset / "garbage.png").write_bytes(b"not a png at all")
    records = json.loads((dataset / "train.json").read_text()) + [
        {"id": "x1", "image": "nope.png", "conversations": turn("<image>", "a")},
        {"id": "x2", "image": "garbage.png", "conversations": turn("<image>", "a")},
        {"id": "x3", "conversations": turn("<image>", "a")},  # a token but no image
        {"id": "x4", "conversations": turn("q", "a")[:1]},  # ends on a human turn
    ]
    (dataset / "dirty.json").write_text(json.dumps(records))
    dm = module(dataset, "dirty.json", on_bad_record="skip")
    stats = dm.stats["train"]
    assert (stats["total"], stats["kept"]) == (7, 3)
    assert (stats["missing_image"], stats["unreadable_image"], stats["bad_conversation"]) == (1, 1, 2)
    assert [s.name for s in dm.datasets["train"].samples] == ["img-a", "txt-b", "img-c"]
    with pytest.raises(BadRecordError, match=r"sample 'x1': image not found: .*nope\.png"):
        module(dataset, "dirty.json", on_bad_record="error")
    (dataset / "dirty2.json").write_text(json.dumps(records[-1:]))
    with pytest.raises(ValueError, match=r"dirty2\.json: sample 'x4': the conversation ends on a human turn"):
        module(dataset, "dirty2.json", on_bad_record="error")


def test_tokenization_mismatch_fails_past_the_threshold(dataset):
    save_byte_tokenizer(dataset / "tok", lowercase=True)
    assert module(dataset).stats["train"]["mismatch"] == 0  # whole pieces: the ids are the tokenizer's own
    records = json.loads((dataset / "train.json").read_text())
    for record in records:  # special-token text goes segment by segment, checked by decoding back
        record["conversations"][0]["value"] += " <|eot_id|>"
    (dataset / "specials.json").write_text(json.dumps(records))
    with pytest.raises(RuntimeError, match=r"train: 3 of 3 samples \(100.00%\) do not tokenize"):
        module(dataset, "specials.json")  # "user" round-trips, "Color?" does not
    records[1]["conversations"][0]["value"] = "Say hi"  # one sample left to train on
    (dataset / "specials.json").write_text(json.dumps(records))
    dm = module(dataset, "specials.json", max_mismatch_ratio=1.0)
    assert (dm.stats["train"]["mismatch"], dm.stats["train"]["kept"]) == (2, 1)


def test_a_leading_gpt_turn_is_dropped_and_counted(dataset):
    records = json.loads((dataset / "train.json").read_text())
    records[1]["conversations"].insert(0, {"from": "gpt", "value": "Hello!"})
    (dataset / "lead.json").write_text(json.dumps(records))
    dm = module(dataset, "lead.json")
    assert (dm.stats["train"]["leading_gpt_dropped"], dm.stats["train"]["kept"]) == (1, 3)
    clean = module(dataset)
    assert dm.datasets["train"][1]["input_ids"].tolist() == clean.datasets["train"][1]["input_ids"].tolist()


def test_truncation_keeps_images_and_drops_what_cannot_fit(dataset):
    # llama3, no system block, byte tokens. Replies start at: img-a 31, img-c 31, txt-b 29 ("hi") and 58;
    # img-late: "yo" at 25, its image at 36. Full lengths: 35, 41, 65, 47.
    records = json.loads((dataset / "train.json").read_text())
    late = turn("Hi", "yo") + turn("<image>\nColor?", "red")
    records.append({"id": "img-late", "image": "a.png", "conversations": late})
    (dataset / "late.json").write_text(json.dumps(records))
    dm = module(dataset, "late.json", max_length=31, val_data_path=None)
    assert {s.name: s.length for s in dm.datasets["train"].samples} == {"txt-b": 31}
    assert dm.stats["train"]["too_long"] == 3  # no reply left (img-a, img-c), image cut off (img-late)
    item = dm.datasets["train"][0]
    assert item["input_ids"].shape == item["labels"].shape == (31,)
    assert dm.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "hi"
    dm = module(dataset, "late.json", max_length=36, val_data_path=None)
    lengths = {s.name: s.length for s in dm.datasets["train"].samples}
    assert lengths == {"img-a": 35, "img-c": 36, "txt-b": 36}
    val = module(dataset, "late.json", max_length=36).stats["val"]  # evaluation samples must fit whole
    assert (val["kept"], val["too_long"]) == (1, 3)


def test_val_set_size_split_is_seeded_and_disjoint(dataset):
    a = module(dataset, val_data_path=None, val_set_size=1, seed=3)
    b = module(dataset, val_data_path=None, val_set_size=1, seed=3)
    ids = lambda dm, s: [x.name for x in dm.datasets[s].samples]  # noqa: E731
    assert ids(a, "val") == ids(b, "val") and len(ids(a, "val")) == 1
    assert sorted(ids(a, "train") + ids(a, "val")) == ["img-a", "img-c", "txt-b"]


def test_val_set_size_split_counts_only_the_records_that_parse(dataset):
    """Skipped JSON Lines lines are in neither part; the held-out part still has val_set_size records, the
    ones at the seeded positions among the records that parse (as the commonsense split draws it)."""
    from effilora_lightning.data.split import seeded_split

    good = [{"id": f"r{i}", "conversations": turn(f"Question {i}?", f"answer {i}")} for i in range(6)]
    lines = [json.dumps(good[0]), "{bad", json.dumps(good[1]), json.dumps(good[2]), "nope", *map(json.dumps, good[3:])]
    (dataset / "gappy.jsonl").write_text("\n".join(lines) + "\n")
    for seed in range(6):
        dm = module(dataset, "gappy.jsonl", val_data_path=None, val_set_size=3, seed=seed, on_bad_record="skip",
                    use_cache=False)
        names = {s: sorted(x.name for x in dm.datasets[s].samples) for s in ("train", "val")}
        want = sorted(f"r{p}" for p in seeded_split(6, 3, seed).held_out)
        assert names["val"] == want, seed
        assert sorted(names["train"] + names["val"]) == sorted(r["id"] for r in good)


def test_a_split_file_is_parsed_once_and_each_part_reads_only_its_records(dataset, monkeypatch, tmp_path):
    """val_set_size splits one file into train and held-out parts: one pass parses every record and notes where
    each starts; each part then decodes only its own records there (``records_at``). When the train part comes
    from the cache, the held-out build reads just its record, and gets the same samples."""
    from effilora_lightning.data import records, visual_build

    parsed: list[str] = []
    located: list[list[int]] = []
    real_iter, real_at = records.RecordStream.__iter__, records.records_at
    monkeypatch.setattr(records.RecordStream, "__iter__", lambda self: (parsed.append(self.path.name), real_iter(self))[1])

    def records_at(path, where):
        where = list(where)
        located.append([index for index, _ in where])
        return real_at(path, where)

    monkeypatch.setattr(visual_build, "records_at", records_at)
    dm = module(dataset, val_data_path=None, val_set_size=1, use_cache=False)
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    held = [int(i) for i in dm.datasets["val"].sample_ids]
    assert parsed == ["train.json"]  # the count (the test split is the val split)
    assert located == [[i for i in range(3) if i not in held], held]  # train part, held-out part

    cache = tmp_path / "cache"
    module(dataset, val_data_path=None, val_set_size=1, cache_dir=str(cache))
    val_entries = [e for e in cache.iterdir() if e.is_dir() and json.loads((e / "meta.json").read_text())["answers"]]
    assert len(val_entries) == 1
    shutil.rmtree(val_entries[0])  # the train part stays cached, the held-out part is built again
    parsed.clear()
    located.clear()
    again = module(dataset, val_data_path=None, val_set_size=1, cache_dir=str(cache))
    assert parsed == ["train.json"] and located == [held]  # count, held-out part
    assert again.built_cache == {"train": False, "val": True}
    want, got = dm.datasets["val"], again.datasets["val"]
    assert len(want) == len(got) == 1 and got.names == want.names and got.answers == want.answers
    for key in ("input_ids", "labels", "prompt_input_ids"):
        assert torch.equal(got[0][key], want[0][key]), key


def test_setup_progress_says_what_its_fraction_is_of(dataset, monkeypatch):
    """A whole file's build counts its progress in the file; a part of a split file in its own records."""
    from effilora_lightning.data import visual_build

    lines: list[str] = []  # what rank_zero_info printed (not caplog: an earlier Trainer may mute its logger)
    monkeypatch.setattr(visual_build, "rank_zero_info", lines.append)
    monkeypatch.setattr(visual_build, "PROGRESS_EVERY_S", 0.0)  # a line for every batch
    monkeypatch.setattr(visual_build, "_CHUNK", 1)
    module(dataset, use_cache=False)  # train and val read the whole file
    whole = [line for line in lines if "records checked and tokenized" in line]
    lines.clear()
    module(dataset, val_data_path=None, val_set_size=1, use_cache=False)  # two parts of one file
    parts = [line for line in lines if "records checked and tokenized" in line]
    assert [line.split("): ")[1].split(" records checked")[0] for line in whole] == ["1", "2", "3"] * 2, whole
    assert all("of the file, about" in line for line in whole), whole
    assert [(line.split(" (")[0], line.split("): ")[1].split(" records checked")[0],
             line.split("records/s, ")[1].split(", about")[0]) for line in parts] == [
        ("visual instruction train", "1", "50% of its 2 records"),
        ("visual instruction train", "2", "100% of its 2 records"),
        ("visual instruction val", "1", "100% of its 1 records")], parts


def _lengths_and_modalities(n: int = 103) -> tuple[list[int], list[bool]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, 500, (n,), generator=g).tolist(), (torch.rand(n, generator=g) < 0.7).tolist()


def test_grouping_sampler_order_depends_only_on_seed_and_epoch():
    lengths, has_image = _lengths_and_modalities()

    def make(seed: int) -> ModalityLengthGroupedSampler:
        return ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, num_replicas=1, seed=seed)

    sampler = make(5)
    order = list(sampler)
    assert sorted(order) == list(range(103)) and len(sampler) == 103
    assert list(sampler) == order and list(make(5)) == order  # a second pass in the epoch, a fresh sampler
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(103))
    sampler.set_epoch(0)
    assert list(sampler) == order
    assert list(make(6)) != order


def test_grouping_sampler_windows_are_one_modality_longest_first():
    lengths, has_image = _lengths_and_modalities()
    order = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, num_replicas=2, seed=5).global_order()
    assert sorted(order) == list(range(103))
    windows = [order[k: k + 8] for k in range(0, 103, 8)]
    n_full = sum(has_image) // 8 + (103 - sum(has_image)) // 8
    for window in windows[:n_full]:
        assert len({has_image[i] for i in window}) == 1
        assert [lengths[i] for i in window] == sorted((lengths[i] for i in window), reverse=True)


def test_grouping_sampler_shards_ranks_into_homogeneous_batches():
    lengths, has_image = _lengths_and_modalities()
    ranks = [ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, num_replicas=2, rank=r, seed=5)
             for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert [len(share) for share in shares] == [len(s) for s in ranks] == [52, 52]
    assert set(shares[0] + shares[1]) == set(range(103))  # one index repeated as padding
    n_full = sum(has_image) // 8 + (103 - sum(has_image)) // 8
    for b in range(n_full):  # batch b of both ranks comes from window b: one modality across the step
        batches = [share[4 * b: 4 * b + 4] for share in shares]
        assert len({has_image[i] for batch in batches for i in batch}) == 1
    assert isinstance(ranks[0], DistributedSampler)  # so Lightning keeps it under DDP instead of wrapping it


def test_grouping_sampler_resume_skips_exactly_the_consumed_samples():
    lengths, has_image = _lengths_and_modalities()

    def rank1() -> ModalityLengthGroupedSampler:
        return ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, num_replicas=2, rank=1, seed=5)

    whole = rank1()
    whole.set_epoch(2)
    expected = list(whole)
    resumed = rank1()
    resumed.resume_at(2, 3 * 4)  # 3 batches of 4 consumed on this rank in epoch 2
    assert list(resumed) == expected[12:] and list(resumed) == expected[12:]  # Lightning may iterate twice
    resumed.set_epoch(2)  # Lightning's own call for the resumed epoch keeps the skip
    assert list(resumed) == expected[12:]
    resumed.set_epoch(3)
    whole.set_epoch(3)
    assert list(resumed) == list(whole)  # later epochs run whole


def test_train_loader_uses_the_grouping_sampler(dataset):
    dm = module(dataset, batch_size=1)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ModalityLengthGroupedSampler)
    assert sorted(sid for batch in loader for sid in batch["sample_name"]) == ["img-a", "img-c", "txt-b"]


def _sample_ids(dm: VisualInstructionDataModule) -> list[str]:
    return [sid for batch in dm.train_dataloader() for sid in batch["sample_name"]]


def _fitting_trainer(epoch: int, batches: int) -> SimpleNamespace:
    """What `state_dict` reads from a Trainer: its stage, world size and epoch progress."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=batches))
    return SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=1, global_rank=0,
                           current_epoch=epoch, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                               batch_progress=progress)))


@pytest.mark.parametrize("grouped", [True, False])
def test_train_loader_resumes_from_the_state_dict_once(dataset, grouped):
    saved = module(dataset, batch_size=1, group_by_modality_length=grouped)
    saved.trainer = _fitting_trainer(epoch=0, batches=1)
    state = saved.state_dict()
    assert state == {"epoch": 0, "batches": 1, "world_size": 1, "batch_size": 1}
    saved.trainer = None
    assert saved.state_dict() == {}  # nothing to resume outside of fitting
    whole = _sample_ids(saved)
    resumed = module(dataset, batch_size=1, group_by_modality_length=grouped)
    resumed.load_state_dict(state)
    assert _sample_ids(resumed) == whole[1:]
    assert _sample_ids(resumed) == whole  # a reloaded loader starts whole: the skip is applied once


def test_resume_with_another_world_or_batch_size_warns_and_a_foreign_state_is_refused(dataset):
    dm = module(dataset, batch_size=1)
    dm.load_state_dict({"epoch": 0, "batches": 1, "world_size": 2, "batch_size": 1})
    with pytest.warns(UserWarning, match="checkpoint used world_size=2, batch_size=1.*same devices"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="lacks 'epoch'/'batches'"):
        dm.load_state_dict({"step": 3})


@pytest.mark.skipif(not (ROOT / "data/checkpoints/tiny-llama/tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
@pytest.mark.parametrize("template", ["vicuna_v1", "llama3"])
def test_bundled_llava_set_loads_cleanly(template):
    dm = VisualInstructionDataModule(str(ROOT / "data/datasets/llava/llava_train.json"), str(ROOT / "data/datasets/llava"),
                                     str(ROOT / "data/checkpoints/tiny-llama"), template=template, image_size=64,
                                     val_data_path=str(ROOT / "data/datasets/llava/llava_test.json"))
    dm.setup("fit")
    assert dm.stats["train"]["kept"] == dm.stats["train"]["total"] == 576
    assert dm.stats["val"]["kept"] == dm.stats["val"]["total"] == 144
