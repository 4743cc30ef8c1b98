"""EncodeAhead: setup tokenizes batch k + 1 in a worker thread while Python finishes batch k. The ids must be the
synchronous path's, in order, whatever the caller does to its own tokenizer meanwhile; and a build with many
batches (the pipeline running) writes the cache entry a one-batch build writes, byte for byte."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from test_token_cache import _entries
from tokenizers import Tokenizer

import effilora_lightning.data.commonsense as commonsense
import effilora_lightning.data.tokenizer as tokenizer_module
import effilora_lightning.data.visual_build as visual_build
from effilora_lightning.data.commonsense import CommonsenseDataModule
from effilora_lightning.data.tokenizer import EncodeAhead, encode_texts, load_tokenizer
from effilora_lightning.data.visual_instruction import VisualInstructionDataModule

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data/checkpoints/tiny-llama"
LLAVA = ROOT / "data/datasets/llava"
COMMONSENSE = ROOT / "data/datasets/commonsense"

BATCHES = [["Hello world<|eot_id|>", "two words"], ["<|start_header_id|>user<|end_header_id|>\n\nHi"],
           [], ["a", "b c", "<|eot_id|><|eot_id|>", "naïve<|eot_id|>"], ["last one"]]


class _Recording:
    """``tokenizers.Tokenizer`` whose copies note the thread every encode_batch of theirs runs in."""

    threads: list[str] = []

    @classmethod
    def from_str(cls, text: str):
        copy = Tokenizer.from_str(text)
        outer = cls

        class Copy:
            def __setattr__(self, name, value):
                setattr(copy, name, value)

            def encode_batch(self, texts, add_special_tokens):
                outer.threads.append(threading.current_thread().name)
                return copy.encode_batch(texts, add_special_tokens=add_special_tokens)

        return Copy()


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("tiktoken", [False, True])
def test_the_worker_thread_encodes_ahead_and_yields_encode_texts_ids_in_order(llama3_tokenizer, monkeypatch, offsets,
                                                                               tiktoken):
    monkeypatch.setattr(tokenizer_module, "Tokenizer", _Recording)
    if not tiktoken:
        monkeypatch.setattr(tokenizer_module, "fast_bpe", lambda tokenizer: None)
    _Recording.threads = []
    drawn = []

    def items():
        for n in range(len(BATCHES)):
            drawn.append(n)
            yield n

    got = []
    for n, encoded in EncodeAhead(llama3_tokenizer, offsets).map(items(), BATCHES.__getitem__):
        assert drawn[-1] == min(n + 1, len(BATCHES) - 1)  # the next item was drawn (and submitted) before this one came
        got.append(encoded)
    assert got == [encode_texts(llama3_tokenizer, texts, offsets) for texts in BATCHES]
    # tiktoken encodes the ASCII texts, specials included; the worker's copy of the Rust tokenizer the non-ASCII one
    assert len(_Recording.threads) == (1 if tiktoken else len(BATCHES))
    assert all(name.startswith("effilora-encode") for name in _Recording.threads)
    first_ids = got[0][0][0] if offsets else got[0][0]
    assert first_ids[-1] == llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")  # special text matched as the token


def test_what_the_caller_does_to_its_tokenizer_meanwhile_never_reaches_the_worker(llama3_tokenizer):
    """The caller's own calls set flags on its Rust tokenizer (``split_special_tokens=True`` here); the worker
    encodes with its own copy, so every batch still matches special tokens in text."""
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    batches = [[f"text {n}<|eot_id|>"] for n in range(4)]
    for _, encoded in EncodeAhead(llama3_tokenizer).map(range(4), batches.__getitem__):
        assert encoded[0][-1] == eot
        split = llama3_tokenizer("x<|eot_id|>", add_special_tokens=False, split_special_tokens=True).input_ids
        assert eot not in split
    assert encode_texts(llama3_tokenizer, ["y<|eot_id|>"])[0][-1] == eot  # and the caller's path resets its flag


def test_one_batch_or_a_slow_tokenizer_is_encoded_in_the_callers_thread(llama3_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "Tokenizer", _Recording)
    _Recording.threads = []
    assert list(EncodeAhead(llama3_tokenizer).map([0], BATCHES.__getitem__)) == [
        (0, encode_texts(llama3_tokenizer, BATCHES[0]))]
    assert list(EncodeAhead(llama3_tokenizer).map([], BATCHES.__getitem__)) == []
    assert _Recording.threads == []  # no copy made


def test_an_error_in_the_worker_reaches_the_caller(llama3_tokenizer):
    with pytest.raises(TypeError):
        list(EncodeAhead(llama3_tokenizer).map(range(3), lambda n: [None] if n == 1 else ["fine"]))


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
@pytest.mark.parametrize("template", ["vicuna_v1", "llama3"])
def test_a_visual_build_in_many_batches_writes_the_one_batch_entry(tmp_path, monkeypatch, template):
    def build(cache: str) -> VisualInstructionDataModule:
        dm = VisualInstructionDataModule(str(LLAVA / "llava_train.json"), str(LLAVA), str(TINY), template=template,
                                         image_size=64, val_data_path=str(LLAVA / "llava_test.json"),
                                         cache_dir=str(tmp_path / cache))
        dm.setup("fit")
        return dm

    whole = build("whole")
    monkeypatch.setattr(visual_build, "_CHUNK", 37)  # 576 training records: 16 batches, the pipeline running
    batched = build("batched")
    assert whole.stats == batched.stats and batched.stats["train"]["kept"] == 576
    assert _entries(tmp_path / "whole") == _entries(tmp_path / "batched")


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
@pytest.mark.parametrize("reference_whitespace", [False, True])
def test_a_commonsense_build_in_many_chunks_writes_the_one_chunk_entry(tmp_path, monkeypatch, reference_whitespace):
    records = json.loads((COMMONSENSE / "commonsense_170k.json").read_text())[:300]
    (tmp_path / "train.json").write_text(json.dumps(records))

    def build(cache: str) -> CommonsenseDataModule:
        dm = CommonsenseDataModule(str(tmp_path / "train.json"), str(COMMONSENSE / "dataset"), str(TINY),
                                   eval_tasks=["boolq", "piqa"], val_set_size=20, cutoff_len=64,
                                   reference_whitespace=reference_whitespace, cache_dir=str(tmp_path / cache))
        dm.setup("fit")
        return dm

    whole = build("whole")
    monkeypatch.setattr(commonsense, "_CHUNK", 23)
    batched = build("batched")
    assert whole.num_truncated_train == batched.num_truncated_train > 0
    assert _entries(tmp_path / "whole") == _entries(tmp_path / "batched")


def test_load_tokenizer_of_the_tiny_model_is_fast():  # the builds above run the worker path only with a fast one
    if not (TINY / "tokenizer.json").is_file():
        pytest.skip("data/checkpoints/tiny-llama not built")
    assert load_tokenizer(TINY).is_fast


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
def test_a_bad_record_in_a_later_batch_still_names_itself_and_stops_the_worker(tmp_path, monkeypatch):
    records = json.loads((LLAVA / "llava_train.json").read_text())[:40]
    records[33]["image"] = "gone/missing.png"  # batch 5 of 7: the worker is encoding while it is checked
    (tmp_path / "broken.json").write_text(json.dumps(records))
    monkeypatch.setattr(visual_build, "_CHUNK", 6)
    dm = VisualInstructionDataModule(str(tmp_path / "broken.json"), str(LLAVA), str(TINY), template="llama3",
                                     image_size=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"sample '{records[33]['id']}': image not found: .*gone/missing\.png"):
        dm.setup("fit")
    assert not [t for t in threading.enumerate() if t.name.startswith("effilora-encode")]  # no worker left behind
    assert not list((tmp_path / "cache").rglob("*.bin"))  # and no half entry
