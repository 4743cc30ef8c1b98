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
    handed_on = []

    def fallback(rest):
        handed_on.extend(rest)
        return [e.ids for e in backend.encode_batch(rest, add_special_tokens=False)]

    assert fast.encode(texts, fallback) == reference
    assert encode_texts(llama3_tokenizer, texts) == reference
    assert handed_on == [t for t in texts if not t.isascii()]  # only non-ASCII text went to the Rust tokenizer
    assert len(handed_on) < 0.15 * len(texts)
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fast.fast("Hello world<|eot_id|>") and fast.encode(["Hello world<|eot_id|>"], fallback)[0][-1] == eot


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


def _llava_texts(tokenizer) -> list[str]:
    """The whole pieces the LLaVA build tokenizes (llama3 template: specials between the messages), and
    fuzzed text around special tokens."""
    from effilora_lightning.data.conversation import get_template, reference_turns, render_conversations

    records = json.loads((ROOT / "data/datasets/llava/llava_train.json").read_text())[:200]
    turns = [reference_turns(r["conversations"])[0] for r in records]
    texts = render_conversations(turns, get_template("llama3"), tokenizer).texts
    rng = random.Random(3)
    specials = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|", "|>"]
    fuzz = ["".join(rng.choice([*specials, " ", "\n\n", "ab", "  x", "9"]) for _ in range(rng.randint(0, 12)))
            for _ in range(2000)]
    return texts + fuzz + ["<|eot_id|><|eot_id|>", "x<|eot_id|>y", "<|reserved_special_token_10|>z", ""]


def test_tiktoken_gives_the_hugging_face_offsets_around_special_tokens(llama3_tokenizer):
    texts = _llava_texts(llama3_tokenizer)
    want = [(e.ids, e.offsets) for e in llama3_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    got = encode_texts(llama3_tokenizer, texts, offsets=True)
    assert got == want
    assert [list(offsets) for _, offsets in got] == [offsets for _, offsets in want]  # element by element, as tuples
    fast = fast_bpe(llama3_tokenizer)
    assert all(fast.fast(t) for t in texts)  # every one of them was tiktoken's, specials matched here
    _, offsets = got[0]
    assert offsets[-1] == want[0][1][-1] and offsets[1:3] == want[0][1][1:3]
    with pytest.raises(IndexError):
        offsets[len(offsets)]


def test_with_a_normalized_added_token_text_holding_added_tokens_goes_to_the_rust_tokenizer(llama3_tokenizer):
    mine = {"id": 128256, "content": "<|mine|>", "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}
    tokenizer = _variant(llama3_tokenizer, lambda spec: spec["added_tokens"].append(mine))
    fast = fast_bpe(tokenizer)
    assert fast is not None and fast.fast("plain") and not fast.fast("a<|eot_id|>") and not fast.fast("<|mine|>")
    texts = _llava_texts(llama3_tokenizer) + ["x<|mine|>y"] * 70
    want = [(e.ids, e.offsets) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert encode_texts(tokenizer, texts, offsets=True) == want


def test_a_batch_is_one_tiktoken_call_and_a_text_holding_the_separator_is_left_to_the_rust_tokenizer(
        llama3_tokenizer, monkeypatch):
    fast = fast_bpe(llama3_tokenizer)
    calls = []
    real = fast._encoding.encode
    monkeypatch.setattr(fast._encoding, "encode", lambda text, **kw: calls.append(text) or real(text, **kw))
    texts = ["one", "", "two<|eot_id|>", f"has the {fast_bpe_module._SEP} in it", "three  "] * 20
    backend = llama3_tokenizer.backend_tokenizer
    handed_on = []

    def fallback(rest):
        handed_on.extend(rest)
        return [(e.ids, e.offsets) for e in backend.encode_batch(rest, add_special_tokens=False)]

    want = [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert fast.encode(texts, fallback, offsets=True) == want
    assert len(calls) == 1  # the 80 other texts, joined
    assert len(handed_on) == 20 and all(fast_bpe_module._SEP in t for t in handed_on)


def test_offsets_searches_answer_as_the_tokenizers_pairs_do(llama3_tokenizer):
    from effilora_lightning.data.fast_bpe import Offsets, PairOffsets

    texts = _llava_texts(llama3_tokenizer)[:300]
    want = [e.offsets for e in llama3_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, (_, got), pairs in zip(texts, encode_texts(llama3_tokenizer, texts, offsets=True), want, strict=True):
        assert isinstance(got, Offsets) and Offsets.of(got) is got
        reference = Offsets.of(pairs)
        assert isinstance(reference, PairOffsets)
        for char in range(len(text) + 2):
            assert got.ending_after(char) == reference.ending_after(char)
            assert got.starting_from(char) == reference.starting_from(char)


def test_holds_finds_each_expected_token_or_says_it_cannot():
    """``holds``: True exactly when every (id, span) expected is a token, in order; False where the bisection of
    the starts lands elsewhere (an empty token starting where the wanted one does), for both offset kinds."""
    from effilora_lightning.data.fast_bpe import Offsets, PairOffsets

    ids, pairs = [7, 9, 7, 5], [(0, 3), (3, 5), (5, 8), (8, 8)]
    shifted = Offsets([100, *(s + 10 for s, _ in pairs)], [100, *(e + 10 for _, e in pairs)], lo=1, base=10)
    for offsets in (Offsets([s for s, _ in pairs], [e for _, e in pairs]), PairOffsets(pairs), shifted):
        assert offsets.holds(ids, [(7, (0, 3)), (7, (5, 8))])
        assert offsets.holds(ids, [])
        assert not offsets.holds(ids, [(7, (5, 8)), (7, (0, 3))])  # out of order
        assert not offsets.holds(ids, [(9, (0, 3))])  # another id there
        assert not offsets.holds(ids, [(7, (0, 2))])  # another span
        assert not offsets.holds(ids, [(5, (9, 9))])  # past the last token
    empty_first = PairOffsets([(0, 0), (0, 3)])
    assert not empty_first.holds([1, 7], [(7, (0, 3))])  # the bisection finds the empty token: cannot tell
