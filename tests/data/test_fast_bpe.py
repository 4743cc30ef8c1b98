"""fast_bpe: tiktoken encodes LLaMA-3's plain text only where it gives the Hugging Face tokenizer's ids, which
the tests compare on real-format records, fuzzed ASCII and Unicode strings, runs and special tokens."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from effilora_lightning.data import fast_bpe as fast_bpe_module
from effilora_lightning.data.fast_bpe import fast_bpe, pretokenizes_as_llama3
from effilora_lightning.data.tokenizer import encode_texts, load_tokenizer

pytest.importorskip("tiktoken")

ROOT = Path(__file__).resolve().parents[2]
COMMONSENSE = ROOT / "data/datasets/commonsense"


def _fuzz(seed: int, n: int, alphabet: list[str], pieces: list[str], longest: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet if k % 2 else pieces + alphabet) for _ in range(rng.randint(0, longest)))
            for k in range(n)]


def _texts() -> list[str]:
    """Real-format instructions and outputs, fuzzed ASCII (every character 0-127) and Unicode, runs of one and two
    characters (where BPE merge order could tell tiktoken's rule from the merge list's), and special tokens."""
    records = json.loads((COMMONSENSE / "commonsense_170k.json").read_text())[:400]
    real = [r["instruction"] for r in records] + [r["output"] for r in records]
    ascii_chars = [chr(i) for i in range(128)]
    pieces = ["the", " The", "'s", "'S", "'ll", "'Re", "123", "45678", " 9", "  ", "\n\n", " \n", "\t", "don't",
              "I'M", "...", "?!", "<|", "|>"]
    runs = [c * n for c in "a =-.\n0!_" for n in range(1, 40)] + [(a + b) * 7 for a in "ab.-= " for b in "ab.-= "]
    unicode = ["".join(chr(random.Random(k).choice([random.Random(k + j).randint(0x80, 0x2FFF),
                                                    random.Random(k + j).randint(0x1F300, 0x1F6FF)]))
                       for j in range(k % 12)) + " mixed ascii" for k in range(300)]
    specials = ["Hello world<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi", "x<|begin_of_text|>y",
                "<|not_a_token|> stays text", "über straße 9", "naïve café"]
    return real + _fuzz(0, 3000, ascii_chars, pieces, 30) + runs + unicode + specials


def test_tiktoken_gives_the_hugging_face_ids_for_every_text(llama3_tokenizer):
    fast = fast_bpe(llama3_tokenizer)
    assert fast is not None
    backend = llama3_tokenizer.backend_tokenizer
    texts = _texts()
    reference = llama3_tokenizer(texts, add_special_tokens=False).input_ids
    assert fast.encode(texts, backend) == reference
    assert encode_texts(llama3_tokenizer, texts) == reference
    plain = [t for t in texts if fast.plain(t)]
    assert len(plain) > 0.85 * len(texts)  # most of it went to tiktoken, ...
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert not fast.plain("Hello world<|eot_id|>") and not fast.plain("über")  # ... never a special or non-ASCII
    assert fast.encode(["Hello world<|eot_id|>"], backend)[0][-1] == eot


def _variant(llama3_tokenizer, change) -> PreTrainedTokenizerFast:
    spec = json.loads(llama3_tokenizer.backend_tokenizer.to_str())
    change(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def _drop_a_merge(spec):
    del spec["model"]["merges"][5000]


def _no_ignore_merges(spec):
    spec["model"]["ignore_merges"] = False


def _swap_two_merges(spec):
    merges = spec["model"]["merges"]
    merges[10], merges[90000] = merges[90000], merges[10]


@pytest.mark.parametrize("change", [_drop_a_merge, _no_ignore_merges, _swap_two_merges])
def test_a_bpe_that_tiktoken_would_not_reproduce_keeps_the_hugging_face_encoder(llama3_tokenizer, change):
    tokenizer = _variant(llama3_tokenizer, change)
    assert pretokenizes_as_llama3(tokenizer)  # the pre-tokenizer is LLaMA-3's, ...
    assert fast_bpe(tokenizer) is None  # ... the model is not tiktoken's rule
    texts = _texts()[:500]
    assert encode_texts(tokenizer, texts) == tokenizer(texts, add_special_tokens=False).input_ids


def test_without_tiktoken_or_with_other_tokenizers_nothing_changes(llama3_tokenizer, tmp_path, monkeypatch):
    llama3_tokenizer.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken raises ImportError
    fresh = load_tokenizer(tmp_path)
    assert pretokenizes_as_llama3(fresh) and fast_bpe(fresh) is None
    monkeypatch.undo()
    tiny = load_tokenizer(ROOT / "data/checkpoints/tiny-llama")  # a trained BPE: not every split is a merge
    assert fast_bpe(tiny) is None


def test_the_facts_are_read_again_when_the_tokenizer_changes(llama3_tokenizer, tmp_path, monkeypatch):
    llama3_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    reads = []
    real = fast_bpe_module._read
    monkeypatch.setattr(fast_bpe_module, "_read", lambda t: reads.append(1) or real(t))
    assert fast_bpe(tokenizer) is not None and fast_bpe(tokenizer) is not None and len(reads) == 1
    tokenizer.split_special_tokens = True
    assert fast_bpe(tokenizer) is None and len(reads) == 2
