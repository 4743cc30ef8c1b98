"""The data half of the bad-input battery: every broken file, record or image is an error before training that
names the file / record / sample and says what to do, or a counted skip that is printed. No training step."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from effilora_lightning.data import CommonsenseDataModule
from effilora_lightning.data.records import RecordError, read_records
from effilora_lightning.data.visual_instruction import BadRecordError, VisualInstructionDataModule, to_rgb

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"


def rec(instruction: str, answer: str = "true") -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def commonsense(tmp_path: Path, train: bytes | None = None, test: bytes | None = None, **kw) -> CommonsenseDataModule:
    (tmp_path / "dataset" / "boolq").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.json").write_bytes(train if train is not None else json.dumps([rec("is it?")]).encode())
    (tmp_path / "dataset" / "boolq" / "test.json").write_bytes(
        test if test is not None else json.dumps([rec("is it?")]).encode())
    kw.setdefault("data_path", str(tmp_path / "train.json"))
    return CommonsenseDataModule(dataset_dir=str(tmp_path / "dataset"), tokenizer_path=str(TINY),
                                 eval_tasks=["boolq"], **kw)


# ------------------------------------------------------------------------------------------- files and records


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    bad = (json.dumps([rec("is it?")])[:-1] + ",\n" + json.dumps(rec("cafe?"))[:-1] + "}]").encode()
    bad = bad.replace(b"cafe", b"caf\xe9")  # latin-1, not UTF-8
    with pytest.raises(RecordError, match=r"train\.json: line 2 is not UTF-8 \(invalid continuation byte at byte \d+\); "
                                          r"save the file as UTF-8"):
        commonsense(tmp_path, train=bad).setup("fit")


def test_a_test_set_that_is_not_utf8_names_it(tmp_path):
    with pytest.raises(RecordError, match=r"boolq/test\.json: line 1 is not UTF-8"):
        commonsense(tmp_path, test=b'[{"instruction": "\xff"}]').setup("test")


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, jsonl):
    records = [rec("is it?"), rec("is it not?", "false")]
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    (tmp_path / "f.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r for _, r in read_records(tmp_path / "f.json")[0]] == records


def test_a_directory_as_data_path_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(RecordError, match=r"data file .*folder is a directory; give the path of a JSON"):
        commonsense(tmp_path, data_path=str(tmp_path / "folder")).setup("fit")


def test_a_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file .*nope\.json does not exist"):
        commonsense(tmp_path, data_path=str(tmp_path / "nope.json")).setup("fit")


def test_a_bad_json_lines_line_is_skipped_counted_and_warned(tmp_path):
    lines = (json.dumps(rec("is it?")) + "\n{not json\n" + json.dumps(rec("is it not?", "false"))).encode()
    with pytest.warns(UserWarning, match=r"skipped 1 malformed records"):
        dm = commonsense(tmp_path, train=lines, on_bad_record="skip")
        dm.setup("fit")
    assert dm.num_skipped == {str(tmp_path / "train.json"): 1}


def test_nothing_left_to_train_after_filtering_fails_at_setup(tmp_path):
    dm = commonsense(tmp_path, cutoff_len=8, train_on_inputs=False)  # every prompt fills 8 tokens
    with pytest.raises(RecordError, match=r"train\.json: no training sequence is left: the prompt of each of its 1 "
                                          r"training records fills cutoff_len=8.*Raise cutoff_len or set "
                                          r"train_on_inputs=True"):
        dm.setup("fit")


@pytest.mark.parametrize("setting", [{"max_steps": 0}, {"max_epochs": 0}, {"limit_train_batches": 0}],
                         ids=lambda s: next(iter(s)))
def test_a_fit_that_would_train_nothing_is_refused_naming_the_setting(tmp_path, setting):
    dm = commonsense(tmp_path)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(**({"max_steps": -1, "max_epochs": None, "limit_train_batches": 1.0} | setting),
                                 world_size=1, global_rank=0)
    key = next(iter(setting))
    with pytest.raises(ValueError, match=rf"trainer\.{key}=0: this fit would train on nothing"):
        dm.train_dataloader()


def test_max_steps_zero_stops_a_real_fit_before_any_step(tmp_path):
    import lightning.pytorch as pl

    from effilora_lightning import CausalLMModule, LoRAConfig

    module = CausalLMModule(adapter=LoRAConfig(rank=2, target_modules=["q_proj"]), model_path=str(TINY))
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"trainer\.max_steps=0: this fit would train on nothing"):
        trainer.fit(module, datamodule=commonsense(tmp_path))


# --------------------------------------------------------------------------------------------------- images

SIZE = 16


def turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def llava(tmp_path: Path) -> Path:
    """images/a.png, images/b.png and a train file with one sample each; tokenizer: the tiny LLaMA's."""
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(tmp_path / "images" / name)
    write_llava(tmp_path, [{"id": "s-a", "image": "a.png", "conversations": turn("<image>\nColor?", "red")},
                           {"id": "s-b", "image": "b.png", "conversations": turn("<image>\nColor?", "red")}])
    return tmp_path


def write_llava(root: Path, records: list, name: str = "train.json") -> Path:
    (root / name).write_text(json.dumps(records))
    return root / name


def visual(root: Path, data: str = "train.json", stage: str = "fit", **kw) -> VisualInstructionDataModule:
    kw = {"image_size": SIZE, "template": "vicuna_v1"} | kw
    dm = VisualInstructionDataModule(str(root / data), str(root / "images"), str(TINY), **kw)
    dm.setup(stage)
    return dm


def truncated_png(path: Path) -> None:
    """A PNG whose header and IHDR are intact (size and mode read fine) but whose pixel data is cut short."""
    Image.new("RGB", (SIZE, SIZE), (0, 255, 0)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])


def test_a_truncated_png_is_refused_at_setup_naming_sample_and_path(llava):
    truncated_png(llava / "images" / "b.png")
    with Image.open(llava / "images" / "b.png") as image:
        assert image.size == (SIZE, SIZE)  # the header alone says nothing is wrong
    with pytest.raises(BadRecordError, match=r"sample 's-b': cannot read image .*images/b\.png"):
        visual(llava)
    dm = visual(llava, on_bad_record="skip")
    assert (dm.stats["train"]["unreadable_image"], dm.stats["train"]["kept"]) == (1, 1)


def test_an_image_that_breaks_after_setup_is_replaced_in_skip_mode_and_named_otherwise(llava):
    truncated_png(llava / "images" / "b.png")
    dm = visual(llava, on_bad_record="skip", image_check="header")  # headers only: setup keeps it
    data = dm.datasets["train"]
    index = [s.name for s in data.samples].index("s-b")
    with pytest.warns(UserWarning, match=r"sample 's-b': cannot read image .*b\.png.*using the next sample instead"):
        item = data[index]
    assert item["sample_name"] == "s-a" and item["images"].shape == (1, 3, SIZE, SIZE)
    strict = visual(llava, image_check="header").datasets["train"]
    with pytest.raises(BadRecordError, match=r"sample 's-b': cannot read image"):
        strict[index]


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = [0, 257 * 100, 65535, 32768]
    image = Image.new("I;16", (4, 1))
    image.putdata(values)
    image.save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as loaded:
        assert loaded.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # what PIL alone does
        rgb = to_rgb(loaded)
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (100, 100, 100), (255,) * 3, (127,) * 3]


@pytest.mark.parametrize("name", ["../outside.png", "/tmp/outside.png", "sub/../../outside.png"])
def test_an_image_path_outside_image_folder_is_refused_unless_allowed(llava, name):
    target = llava / "outside.png" if not name.startswith("/") else Path(name)
    Image.new("RGB", (SIZE, SIZE)).save(target)
    write_llava(llava, [{"id": "s-out", "image": name, "conversations": turn("<image>\nColor?", "black")},
                        {"id": "s-a", "image": "a.png", "conversations": turn("<image>\nColor?", "red")}])
    with pytest.raises(BadRecordError, match=rf"sample 's-out': image '{name}' resolves to .*outside.png, outside "
                                             r"image_folder .*allow_images_outside_folder=True"):
        visual(llava)
    assert visual(llava, on_bad_record="skip").stats["train"]["image_outside_folder"] == 1
    assert visual(llava, allow_images_outside_folder=True).stats["train"]["kept"] == 2


def test_a_missing_image_in_the_test_split_stops_a_fit_at_setup(llava):
    write_llava(llava, [{"id": "t-gone", "image": "gone.png", "conversations": turn("<image>\nColor?", "red")}],
                "test.json")
    with pytest.raises(BadRecordError, match=r"sample 't-gone': image not found: .*gone\.png"):
        visual(llava, test_data_path=str(llava / "test.json"))  # stage "fit": before any training step


def test_an_image_larger_than_pils_limit_is_named(llava, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE // 4)  # SIZE^2 > 2x the limit: a bomb to PIL
    with pytest.raises(BadRecordError, match=r"sample 's-a': image .*a\.png is larger than PIL accepts .*"
                                             r"MAX_IMAGE_PIXELS"):
        visual(llava)


def test_an_unreadable_visual_file_names_file_and_line(llava):
    (llava / "latin.json").write_bytes(b'[{"id": "x",\n "conversations": "\xe9"}]')
    with pytest.raises(RecordError, match=r"latin\.json: line 2 is not UTF-8"):
        visual(llava, "latin.json")


def test_visual_files_are_read_by_content_with_or_without_bom(llava):
    records = json.loads((llava / "train.json").read_text())
    (llava / "lines.json").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode())
    assert visual(llava, "lines.json").stats["train"]["kept"] == 2  # JSON Lines named .json, with a BOM


def test_a_record_that_is_not_an_object_is_named_or_counted(llava):
    write_llava(llava, [["not", "an", "object"], {"id": "s-a", "image": "a.png",
                                                 "conversations": turn("<image>\nColor?", "red")}])
    with pytest.raises(BadRecordError, match=r"sample 'train.json#0': record 0 is a list, expected an object"):
        visual(llava)
    assert visual(llava, on_bad_record="skip").stats["train"]["bad_record"] == 1


def test_no_training_sample_left_fails_at_setup(llava):
    write_llava(llava, [{"id": "s-gone", "image": "gone.png", "conversations": turn("<image>\nColor?", "red")}])
    with pytest.raises(RecordError, match=r"train\.json: no training sample is left after the checks .*"
                                          r"'missing_image': 1"):
        visual(llava, on_bad_record="skip")


def test_image_check_is_range_checked():
    with pytest.raises(ValueError, match="image_check must be 'decode' or 'header', got 'pixels'"):
        VisualInstructionDataModule("x.json", "imgs", str(TINY), image_check="pixels")


def test_png_helper_really_truncates(tmp_path):
    """The truncated PNG above keeps its signature and IHDR chunk (so only a decode can tell)."""
    truncated_png(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    length, = struct.unpack(">I", data[8:12])
    assert zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length: 20 + length])[0]
