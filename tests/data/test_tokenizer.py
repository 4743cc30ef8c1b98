"""load_tokenizer: local files only, clear errors, and a pad token that is never LLaMA-3's text token id 0."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from effilora_lightning.data.tokenizer import load_tokenizer

TINY_LLAMA = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "tiny-llama"


def save_tokenizer(directory: Path, specials: list[str], pad: str | None = None, unk_special: bool = False) -> Path:
    """A word-level tokenizer whose id 0 is the text token "!" (as in LLaMA-3), plus the given specials."""
    words = ["!", "hello", "world"] + (["<unk>"] if unk_special else [])
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if unk_special else None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<bos>", "<eos>", *specials])
    kwargs = {"pad_token": pad} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", **kwargs)
    fast.save_pretrained(directory)
    return directory


def test_missing_directory_names_path_and_says_no_download(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*no download is attempted"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer file in {tmp_path}.*no download is attempted"):
        load_tokenizer(tmp_path)


def test_llama3_style_gets_reserved_special_token_0(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"])
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "<|reserved_special_token_0|>"
    assert tok.pad_token_id == 5
    assert tok.padding_side == "right"


def test_finetune_right_pad_id_is_preferred(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, ["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"])
    assert load_tokenizer(tmp_path).pad_token == "<|finetune_right_pad_id|>"


def test_existing_pad_token_is_kept(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, ["<mypad>", "<|reserved_special_token_0|>"], pad="<mypad>")
    assert load_tokenizer(tmp_path).pad_token == "<mypad>"


def test_explicit_pad_token_and_padding_side(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"])
    tok = load_tokenizer(tmp_path, pad_token="<|reserved_special_token_1|>", padding_side="left")
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("<|reserved_special_token_1|>", 6, "left")


def test_no_candidate_raises_and_asks_for_pad_token(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, [])
    with pytest.raises(ValueError, match=r"has no pad token.*Pass pad_token="):
        load_tokenizer(tmp_path)


def test_text_token_id_0_is_refused_as_pad(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, [])
    with pytest.raises(ValueError, match=r"pad_token '!' has id 0 and is not a special token"):
        load_tokenizer(tmp_path, pad_token="!")


def test_special_unk_is_a_fallback(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, [], unk_special=True)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "<unk>"
    assert tok.pad_token_id == 3


def test_pad_token_outside_vocabulary_is_refused(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, ["<|reserved_special_token_0|>"])
    with pytest.raises(ValueError, match=r"pad_token '<pad>' is not in the vocabulary"):
        load_tokenizer(tmp_path, pad_token="<pad>")


def test_bad_padding_side(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        load_tokenizer(tmp_path, padding_side="middle")


def test_bundled_tiny_llama() -> None:
    tok = load_tokenizer(TINY_LLAMA)
    assert tok.pad_token == "<|reserved_special_token_0|>"
    assert tok.pad_token_id not in (0, tok.bos_token_id, tok.eos_token_id)
    ids = tok("the apple").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids


_REPEATED = ["the correct answer is true", "the correct answer is false", " the correct answer is true",
             "the correct answer is true", "", "<|begin_of_text|>the correct answer is true", "Ünïcödé  spaces\n\n",
             "the correct answer is true ", "Ünïcödé  spaces\n\n", "the correct answer is false"]


def _tokenized_once_is_each_texts_own(tok) -> None:
    from effilora_lightning.data.commonsense_examples import token_ids

    alone = [tok(text, add_special_tokens=False).input_ids for text in _REPEATED]
    bos = tok.bos_token_id
    assert token_ids(tok, _REPEATED, bos) == [ids[1:] if ids[:1] == [bos] else ids for ids in alone]


def test_texts_tokenized_once_per_distinct_text_are_each_texts_own_ids_llama3(llama3_tokenizer) -> None:
    """``token_ids`` tokenizes each distinct text once (the commonsense outputs repeat): exact, because a batch
    encode is the encode of each text alone and equal strings encode equally; checked against one unmemoized
    call per text on the real LLaMA-3 BPE and on the SentencePiece-style tokenizers."""
    _tokenized_once_is_each_texts_own(llama3_tokenizer)


def test_texts_tokenized_once_per_distinct_text_are_each_texts_own_ids_sentencepiece(sp_tokenizer) -> None:
    _tokenized_once_is_each_texts_own(sp_tokenizer)
