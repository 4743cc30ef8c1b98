"""LLaMA-3's plain text through tiktoken: the same ids as the Hugging Face tokenizer, about 3.5x less CPU.

A cold setup is bound by the BPE encoder (the 170k-record commonsense build: ~20 M tokens, ~27 CPU-seconds in
the Rust ``tokenizers`` BPE, 8 in tiktoken, measured single-threaded on the benchmark file). LLaMA-3's
tokenizer.json is a conversion of Meta's tiktoken model, so tiktoken computes the same ids when the conversion
is faithful; ``fast_bpe`` checks that it is, from the tokenizer's serialized form, before it is used:

* the pre-tokenizer is LLaMA-3's regex (``LLAMA3_SPLIT``, "Isolated") then a byte-level step without a regex of
  its own, and there is no normalizer (``pretokenizes_as_llama3``);
* the model is a byte-level BPE with ``ignore_merges`` (a pre-token that is a whole vocabulary entry is one
  token, as in tiktoken), no dropout, byte fallback, unknown token or affixes;
* the merges are tiktoken's ranks: merge i makes a token whose rank never decreases with i, and every split of a
  vocabulary entry into two entries is a merge (tiktoken merges any adjacent pair whose bytes are a token);
* a set of probe texts (runs, contractions, digits, whitespace) gives the same ids both ways.

Only ASCII text goes to tiktoken: ASCII keeps the regex engines (Oniguruma there, fancy-regex here) on
character classes they cannot read differently. Added tokens (LLaMA-3's specials) in it are matched as tiktoken
special tokens, which split the text as the Hugging Face tokenizer's added-token match does, when none is
normalized and none is a prefix of another (else text holding one goes to the Hugging Face tokenizer). Character
offsets, where asked for, come from the tokens' lengths (in ASCII text the tokens cover it end to end). Any
other text is encoded by the Hugging Face tokenizer, so ids and offsets are exact for every text (tests: the
real LLaMA-3 tokenizer on real-format records, fuzzed ASCII and Unicode strings, LLaVA pieces around special
tokens; the 170k commonsense and 66.5k LLaVA benchmark caches byte for byte). Without tiktoken installed, or
for any tokenizer that fails a check, nothing changes.
"""

from __future__ import annotations

import bisect
import json
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

__all__ = ["LLAMA3_SPLIT", "FastBPE", "Offsets", "PairOffsets", "fast_bpe", "pretokenizes_as_llama3"]

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""LLaMA-3's pre-tokenizer regex (tokenizer.json: a Split, "Isolated", before a ByteLevel without its own regex)."""

_PROBES = ("Hello, world 2024!", "don't I'M they'll 'S", "1234567 89", "  two  spaces\t\ttabs\n\n\nlines \n",
           "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "----------========..........", "x", "", " ", "\n",
           "Answer format: ending1/ending2/ending3/ending4", "C++ a->b [x] {y} (z) #1 $2 %3 ^4 &5 *6 _7 =8 ~9",
           "\x00\x01\x0b\x0c\x1c\x1f\x7f")
"""Texts compared at construction: tiktoken's ids must equal the Hugging Face tokenizer's."""

_SEP = "\x00<|effilora-fast-bpe-separator|>\x00"
"""Joins the texts of one tiktoken call; a text holding it is left to the Hugging Face tokenizer."""

_CACHE: weakref.WeakKeyDictionary[Any, tuple[tuple[int, bool], tuple[bool, FastBPE | None]]] = \
    weakref.WeakKeyDictionary()


def pretokenizes_as_llama3(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` is a Rust BPE with LLaMA-3's pre-tokenizer and nothing that acts across it (no
    normalizer, no added token that strips whitespace or holds a newline), read from its serialized form."""
    return _facts(tokenizer)[0]


def fast_bpe(tokenizer: PreTrainedTokenizerBase) -> FastBPE | None:
    """The ``FastBPE`` of ``tokenizer``, or None where tiktoken is missing or any check of the module docstring
    fails."""
    return _facts(tokenizer)[1]


def _facts(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, FastBPE | None]:
    """``pretokenizes_as_llama3`` and ``fast_bpe`` of ``tokenizer``, worked out together from one read of its
    serialized form (~1.5 s for LLaMA-3's 128k vocabulary; a cold build needs both), again only when the
    tokenizer gained added tokens or its ``split_special_tokens`` changed since."""
    stamp = (len(tokenizer), bool(getattr(tokenizer, "split_special_tokens", False)))
    try:
        cached_stamp, facts = _CACHE[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: never seen for a transformers tokenizer
        return _read(tokenizer)
    else:
        if cached_stamp == stamp:
            return facts
    facts = _read(tokenizer)
    _CACHE[tokenizer] = (stamp, facts)
    return facts


def _read(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, FastBPE | None]:
    spec = _spec(tokenizer)
    if spec is None or not _pretokenizes_as_llama3(spec):
        return False, None
    return True, _make(tokenizer, spec)


class FastBPE:
    """Encodes ASCII text with tiktoken, added tokens (LLaMA-3's specials) matched in it as the Hugging Face
    tokenizer matches them, and hands every other text to a fallback (see module).

    A batch is ONE tiktoken call: its texts joined by a separator that tiktoken knows as a special token (so no
    pre-token crosses it, as none crosses the ends of separately encoded texts) and split at the separator's id
    after. One call releases the GIL once for the whole batch: a call per text would hand the GIL back and forth
    with the thread building rows in Python (setup's worker thread, ``tokenizer.EncodeAhead``), which serialized
    the two threads: the 665k LLaVA build took 361 s that way, against 354 s with the Rust tokenizer's batch call
    and 315 s with one tiktoken call per batch (BENCHMARKS.md).
    """

    def __init__(self, encoding: Any, sep: str, matches_added: bool, prefixes: tuple[str, ...],
                 lengths: np.ndarray) -> None:
        self._encoding = encoding  # tiktoken.Encoding: the separator and (matches_added) the added tokens special
        self._allowed = set(encoding.special_tokens_set)
        self._sep, self._sep_id = sep, encoding.encode_single_token(sep)
        self._matches_added, self._prefixes = matches_added, prefixes
        self._lengths = lengths  # (vocab + 1,) characters of each token (the separator's included) in ASCII text

    def fast(self, text: Any) -> bool:
        """Whether ``text`` is encoded here: ASCII (anything that is not a string goes to the fallback, where the
        Hugging Face tokenizer raises its own error), without the separator, and no added token in it unless
        they can be matched here."""
        return isinstance(text, str) and text.isascii() and self._sep not in text and (
            self._matches_added or not any(p in text for p in self._prefixes))

    def encode(self, texts: list[Any], fallback: Callable[[list[Any]], list[Any]], offsets: bool = False
               ) -> list[Any]:
        """``encode_texts``' result for ``texts``: ids, or ``(ids, character offsets)`` with ``offsets``, of the
        texts encoded here, and ``fallback(others)``'s for the others, in order."""
        out: list[Any] = [None] * len(texts)
        mine = [i for i, text in enumerate(texts) if self.fast(text)]
        if mine:
            batch = [texts[i] for i in mine]
            ids = self._encoding.encode(self._sep.join(batch), allowed_special=self._allowed, disallowed_special=())
            if offsets:  # the joined text's: its tokens cover it end to end
                ends = np.cumsum(self._lengths[np.asarray(ids, np.int64)]).tolist()
                starts = [0, *ends[:-1]]
            start = base = 0
            for k, (i, text) in enumerate(zip(mine, batch)):
                stop = ids.index(self._sep_id, start) if k + 1 < len(mine) else len(ids)
                row = ids[start:stop]
                out[i] = (row, Offsets(starts, ends, start, stop, base)) if offsets else row
                start, base = stop + 1, base + len(text) + len(self._sep)
        rest = [i for i, encoded in enumerate(out) if encoded is None]
        if rest:
            for i, encoded in zip(rest, fallback([texts[i] for i in rest]), strict=True):
                out[i] = encoded
        return out


class Offsets(Sequence[tuple[int, int]]):
    """The (start, end) character offsets of a text's tokens, as the Hugging Face tokenizer gives them (a list of
    tuples), held as two int lists that may be shared by every text of a batch (tokens ``lo:hi`` of them, their
    characters counted from ``base``): no per-token Python object is made, and the conversation encoder finds
    a character's token by one C-level bisection of a list."""

    __slots__ = ("_char0", "_ends", "_hi", "_lo", "_starts")

    def __init__(self, starts: list[int], ends: list[int], lo: int = 0, hi: int | None = None, base: int = 0
                 ) -> None:
        self._starts, self._ends, self._lo, self._char0 = starts, ends, lo, base
        self._hi = len(ends) if hi is None else hi

    @staticmethod
    def of(pairs: Sequence[tuple[int, int]]) -> Offsets | PairOffsets:
        """Offsets already, or the tokenizer's own (start, end) pairs searched where they are (``PairOffsets``)."""
        return pairs if isinstance(pairs, (Offsets, PairOffsets)) else PairOffsets(pairs)

    def ending_after(self, char: int) -> int:
        """The first token whose end is after ``char`` (offsets are non-decreasing)."""
        return bisect.bisect_right(self._ends, char + self._char0, self._lo, self._hi) - self._lo

    def starting_from(self, char: int) -> int:
        """The first token whose start is ``char`` or after."""
        return bisect.bisect_left(self._starts, char + self._char0, self._lo, self._hi) - self._lo

    def holds(self, ids: Sequence[int], expected: Sequence[tuple[int, tuple[int, int]]]) -> bool:
        """Whether each (id, (start, end)) of ``expected``, in order, is one token here, at increasing positions
        (``ids``: these tokens' ids). False also where a bisection cannot tell (two tokens starting at one
        character): the caller then compares token by token. One call per text, each span one bisection."""
        starts, ends, lo, hi, char0, last = self._starts, self._ends, self._lo, self._hi, self._char0, -1
        for token_id, (start, end) in expected:
            k = bisect.bisect_left(starts, start + char0, lo, hi)
            if k <= last or k == hi or starts[k] != start + char0 or ends[k] != end + char0 or ids[k - lo] != token_id:
                return False
            last = k
        return True

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return (self._starts[self._lo + k] - self._char0, self._ends[self._lo + k] - self._char0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == [tuple(o) for o in other]

    def __repr__(self) -> str:
        return f"Offsets({list(self)!r})"


class PairOffsets(Sequence[tuple[int, int]]):
    """``Offsets``' searches over the Hugging Face tokenizer's list of (start, end) tuples, in place (a bisection
    with a key: nothing is copied per token)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        self._pairs = pairs

    def ending_after(self, char: int) -> int:
        return bisect.bisect_right(self._pairs, char, key=_END)

    def starting_from(self, char: int) -> int:
        return bisect.bisect_left(self._pairs, char, key=_START)

    def holds(self, ids: Sequence[int], expected: Sequence[tuple[int, tuple[int, int]]]) -> bool:
        """``Offsets.holds`` over the pairs."""
        pairs, last = self._pairs, -1
        for token_id, span in expected:
            k = bisect.bisect_left(pairs, span[0], key=_START)
            if k <= last or k == len(pairs) or tuple(pairs[k]) != span or ids[k] != token_id:
                return False
            last = k
        return True

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, k: Any) -> Any:
        return [tuple(p) for p in self._pairs[k]] if isinstance(k, slice) else tuple(self._pairs[k])


_START, _END = operator.itemgetter(0), operator.itemgetter(1)


def _spec(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False):
        return None
    return json.loads(backend.to_str())


def _pretokenizes_as_llama3(spec: dict[str, Any]) -> bool:
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    return (spec.get("normalizer") is None and spec["model"].get("type") == "BPE" and len(steps) == 2
            and steps[0] == {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                             "invert": False}
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
            and not steps[1].get("use_regex")
            and not any(t["lstrip"] or t["rstrip"] or t["single_word"] or "\n" in t["content"]
                        for t in spec.get("added_tokens", [])))


def _make(tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> FastBPE | None:
    try:
        import tiktoken
    except ImportError:
        return None
    model = spec["model"]
    if not (model.get("ignore_merges") and model.get("dropout") is None and not model.get("byte_fallback")
            and model.get("unk_token") is None and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix")):
        return None
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if not _merges_are_ranks(vocab, merges):
        return None
    byte_of = _byte_level_alphabet()
    try:
        ranks = {bytes(byte_of[ch] for ch in token): rank for token, rank in vocab.items()}
    except KeyError:  # a vocabulary entry outside the byte-level alphabet
        return None
    if len(ranks) != len(vocab):
        return None
    added_tokens = spec.get("added_tokens", [])
    added = {t["content"]: t["id"] for t in added_tokens}
    # the tokenizer matches added tokens leftmost-longest, tiktoken leftmost-first in no set order: the same
    # where no added token is a prefix of another (adjacent in sorted order, if any is); none normalized
    contents = sorted([*added, _SEP])
    matches_added = not any(t.get("normalized") for t in added_tokens) and \
        not any(b.startswith(a) for a, b in zip(contents, contents[1:]))
    sep_id = max([*ranks.values(), *added.values()]) + 1
    specials = {**(added if matches_added else {}), _SEP: sep_id}
    encoding = tiktoken.Encoding("effilora-fast-bpe", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                                 special_tokens=specials)
    lengths = np.zeros(sep_id + 1, np.int64)
    for token, rank in ranks.items():
        lengths[rank] = len(token)  # bytes = characters in ASCII text
    for content, token_id in specials.items():
        lengths[token_id] = len(content)
    prefixes = tuple(dict.fromkeys(content[:2] for content in added))
    fast = FastBPE(encoding, _SEP, matches_added, prefixes, lengths)
    reference = tokenizer.backend_tokenizer
    if reference.encode_special_tokens:  # match special tokens in text, as ``encode_texts`` does before it encodes
        reference.encode_special_tokens = False
    probes = [*_PROBES, *(f"a{c}b {c}{c}" for c in [c for c in added if c.isascii()][:3])]

    def hugging_face(texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        return [(e.ids, e.offsets) for e in reference.encode_batch(texts, add_special_tokens=False)]

    if fast.encode(probes, hugging_face, offsets=True) != hugging_face(probes):
        return None
    return fast


def _merges_are_ranks(vocab: dict[str, int], merges: list[tuple[str, ...]]) -> bool:
    """Whether the BPE merges are tiktoken's rule: merge i makes a vocabulary entry whose id never decreases with
    i, and the merges are every split of an entry into two entries (tiktoken merges any such pair)."""
    made = []
    for pair in merges:
        if len(pair) != 2 or pair[0] + pair[1] not in vocab:
            return False
        made.append(vocab[pair[0] + pair[1]])
    if any(later < earlier for earlier, later in zip(made, made[1:])):
        return False
    merge_set = set(merges)
    splits = 0
    for token in vocab:
        for k in range(1, len(token)):
            if token[:k] in vocab and token[k:] in vocab:
                if (token[:k], token[k:]) not in merge_set:
                    return False
                splits += 1
    return splits == len(merge_set)


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's character for each byte (GPT-2's table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars
