"""Load a tokenizer from a local directory and give it an explicit, safe pad token.

LLaMA-3 ships without a pad token, and the LLM-Adapters scripts set ``pad_token_id = 0``, which in LLaMA-3 is
the real token "!". Here the pad token is chosen by NAME among tokens that never occur in text, labels are
masked with -100 elsewhere (never by pad id), and nothing is ever downloaded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from effilora_lightning.data.fast_bpe import fast_bpe
from effilora_lightning.data.memory import release_freed_memory

__all__ = ["PAD_TOKEN_CANDIDATES", "EncodeAhead", "encode_texts", "load_tokenizer"]

T = TypeVar("T")

PAD_TOKEN_CANDIDATES: tuple[str, ...] = (
    "<|finetune_right_pad_id|>",  # LLaMA-3.1 and later
    "<|reserved_special_token_0|>",  # LLaMA-3
    "<pad>",
    "<unk>",  # LLaMA-2 style vocabularies
)
"""Pad tokens tried in order when the tokenizer has none and ``pad_token`` is not given."""

_FAST_MIN = 64
"""Fewest texts in one call that make ``encode_texts`` build the tiktoken encoder (``fast_bpe``, ~1 s once)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(
    path: str | os.PathLike[str],
    pad_token: str | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in directory ``path`` (``local_files_only=True``) and set its pad token.

    The pad token is ``pad_token`` when given (it must already be in the vocabulary, so the model's
    embeddings need no resizing), else the tokenizer's own pad token, else the first of
    ``PAD_TOKEN_CANDIDATES`` present. Token id 0 is only accepted when it is a special token: in LLaMA-3
    it is "!", real text.

    Raises:
        FileNotFoundError: the directory or its tokenizer files are missing (no download is attempted).
        ValueError: no usable pad token, or ``pad_token`` / ``padding_side`` is invalid.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    directory = _check_directory(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.pad_token = _choose_pad_token(tokenizer, pad_token, directory)
    tokenizer.padding_side = padding_side
    release_freed_memory()  # loading a 128k vocabulary leaves ~160 MB of freed heap behind
    return tokenizer


def _check_directory(directory: Path) -> Path:
    """Fail with a message naming the path when the tokenizer cannot be loaded from local files."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {directory} does not exist. Tokenizers are loaded from local files only; "
            "no download is attempted. Point tokenizer_path at a checkpoint directory (e.g. data/checkpoints/tiny-llama)."
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer file in {directory} (looked for {', '.join(_TOKENIZER_FILES)}). Tokenizers are "
            "loaded from local files only; no download is attempted. Save the tokenizer into that directory."
        )
    return directory


def _choose_pad_token(tokenizer: PreTrainedTokenizerBase, requested: str | None, directory: Path) -> str:
    """Return the pad token string to use (see ``load_tokenizer``)."""
    vocab = tokenizer.get_vocab()
    if requested is not None:
        if requested not in vocab:
            raise ValueError(
                f"pad_token {requested!r} is not in the vocabulary of the tokenizer in {directory}; adding it "
                "would need resized embeddings. Pass a token the vocabulary has and that never occurs in text."
            )
        if not _safe_pad(tokenizer, vocab[requested]):
            raise ValueError(
                f"pad_token {requested!r} has id 0 and is not a special token of the tokenizer in {directory} "
                "(in LLaMA-3 id 0 is the text token '!'). Pass a special token such as a reserved one."
            )
        return requested
    if tokenizer.pad_token is not None:
        return tokenizer.pad_token
    for candidate in PAD_TOKEN_CANDIDATES:
        if candidate in vocab and _safe_pad(tokenizer, vocab[candidate]):
            return candidate
    raise ValueError(
        f"the tokenizer in {directory} has no pad token and none of {', '.join(PAD_TOKEN_CANDIDATES)} is in its "
        "vocabulary. Pass pad_token=<a token of the vocabulary that never occurs in your data>."
    )


def _safe_pad(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """Id 0 is acceptable only as a special token (LLaMA-2's <unk>), never as a text token (LLaMA-3's '!')."""
    if token_id != 0:
        return True
    added = tokenizer.added_tokens_decoder.get(0)
    return 0 in tokenizer.all_special_ids or (added is not None and added.special)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], offsets: bool = False) -> list[Any]:
    """``tokenizer(texts, add_special_tokens=False).input_ids``, through the Rust tokenizer directly when there
    is one: the same ids, without building a Python BatchEncoding (attention masks, per-row conversions) that
    costs as much as the tokenization itself at 170k records.

    ``offsets=True``: ``(ids, character offsets)`` per text, special tokens matched in the text whatever the
    tokenizer's ``split_special_tokens`` (the conversation encoder checks for message text that became one).

    A call of at least ``_FAST_MIN`` texts encodes LLaMA-3's ASCII text with tiktoken where ``fast_bpe`` proved
    that it gives the same ids and offsets (``data/fast_bpe.py``): a cold build's encoder time / 3.5.
    """
    if not texts:  # (a batch whose records were all skipped; a tokenizer without offsets renders none)
        return []
    backend = _backend(tokenizer, offsets)
    if backend is None:
        if not offsets:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
        return [(ids, [tuple(o) for o in offs])
                for ids, offs in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)]
    _match_specials(backend)
    fast = fast_bpe(tokenizer) if len(texts) >= _FAST_MIN else None
    if fast is not None:
        return fast.encode(texts, lambda rest: _unpack(backend.encode_batch(rest, add_special_tokens=False), offsets),
                           offsets)
    return _unpack(backend.encode_batch(texts, add_special_tokens=False), offsets)


class EncodeAhead:
    """Tokenizes the next batch of a setup loop in a worker thread while the caller works on the current one.

    Setup alternates Rust (the encoder, on every core) and Python (rendering, checks, labels, writing rows: one
    core, the others idle). The Rust encoder releases the GIL, so encoding batch k + 1 while Python finishes
    batch k hides the encoder's time behind the Python work where there is a core for each. The worker encodes
    with its OWN copy of the Rust tokenizer (0.5 s to make for LLaMA-3's, made only when there is a second
    batch and, where tiktoken encodes (``fast_bpe``), only once a text is left to the Rust tokenizer): the caller's own tokenizer calls set flags on the shared object (``encode_special_tokens``), which
    would race the worker's. The ids are ``encode_texts``' (the same tokenizer state and flags).

    Without a Rust tokenizer (or with ``split_special_tokens`` and no ``offsets``), every batch is encoded in
    the caller's thread, by ``encode_texts``.

    Why a thread and not a process pool here (``datasets.map(num_proc=...)``): the encoder already runs on every
    core; worker processes would pickle records and ids across pipes and each load the tokenizer, to
    parallelize the one part that is already parallel. The serial part is Python, which the ranks of a node
    split between them, and each rank between forked copies of itself (``node_build``: no pickling, each piece
    writes its own rows), each with its own ``EncodeAhead``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, offsets: bool = False) -> None:
        self.tokenizer, self.offsets = tokenizer, offsets
        self._backend = _backend(tokenizer, offsets)
        self._fast = fast_bpe(tokenizer) if self._backend is not None else None

    def map(self, items: Iterable[T], texts_of: Callable[[T], list[str]]) -> Iterator[tuple[T, list[Any]]]:
        """Yield ``(item, encode_texts(tokenizer, texts_of(item), offsets))`` for each item, in order.
        ``items`` and ``texts_of`` run in the caller's thread, one item ahead of what is yielded."""
        items = iter(items)
        first, second = next(items, _DONE), next(items, _DONE)
        if self._backend is None or second is _DONE:  # nothing to overlap with
            for item in itertools.chain((first, second), items):
                if item is not _DONE:
                    yield item, encode_texts(self.tokenizer, texts_of(item), self.offsets)
            return
        serialized, copies = self._backend.to_str(), []  # (read here: the caller may set flags on it meanwhile)
        fast, offsets = self._fast, self.offsets

        def worker() -> Tokenizer:  # the worker's own Rust tokenizer; with tiktoken, made only if a text needs it
            if not copies:
                copies.append(Tokenizer.from_str(serialized))
                copies[0].encode_special_tokens = False
            return copies[0]

        def encode(texts: list[str]) -> list[Any]:  # in the worker thread: Rust, the GIL released
            if fast is not None:  # tiktoken, and the worker's copy for the texts it leaves
                return fast.encode(texts, lambda rest: _unpack(worker().encode_batch(rest, add_special_tokens=False),
                                                               offsets), offsets)
            return worker().encode_batch(texts, add_special_tokens=False)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="effilora-encode") as pool:
            pending = [(first, pool.submit(encode, texts_of(first)))]
            for item in itertools.chain((second,), items):
                pending.append((item, pool.submit(encode, texts_of(item))))
                done, future = pending.pop(0)
                yield done, self._result(future.result())
            done, future = pending.pop()
            yield done, self._result(future.result())

    def _result(self, encoded: list[Any]) -> list[Any]:
        return encoded if self._fast is not None else _unpack(encoded, self.offsets)


def _backend(tokenizer: PreTrainedTokenizerBase, offsets: bool) -> Any:
    """The Rust tokenizer to call directly, or None where ``tokenizer(...)`` must run (no fast tokenizer, or one
    that splits special tokens when the caller keeps the tokenizer's own choice)."""
    if not getattr(tokenizer, "is_fast", False) and not offsets:
        return None
    if not offsets and getattr(tokenizer, "split_special_tokens", False):
        return None
    return getattr(tokenizer, "backend_tokenizer", None)


def _match_specials(backend: Any) -> None:
    """Match special tokens in text, as ``tokenizer(..., split_special_tokens=False)`` does. The flag persists on
    the Rust object; it is written only when it differs (a write needs exclusive access to the object)."""
    if backend.encode_special_tokens:
        backend.encode_special_tokens = False


def _unpack(encodings: list[Any], offsets: bool) -> list[Any]:
    """Python ids (and offsets) of Rust ``Encoding``s."""
    return [(e.ids, e.offsets) for e in encodings] if offsets else [e.ids for e in encodings]


_DONE = object()
