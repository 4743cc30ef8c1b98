"""Load a tokenizer from a local directory and give it an explicit, safe pad token.

LLaMA-3 ships without a pad token, and the LLM-Adapters scripts set ``pad_token_id = 0``, which in LLaMA-3 is
the real token "!". Here the pad token is chosen by NAME among tokens that never occur in text, labels are
masked with -100 elsewhere (never by pad id), and nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

__all__ = ["PAD_TOKEN_CANDIDATES", "encode_texts", "load_tokenizer"]

PAD_TOKEN_CANDIDATES: tuple[str, ...] = (
    "<|finetune_right_pad_id|>",  # LLaMA-3.1 and later
    "<|reserved_special_token_0|>",  # LLaMA-3
    "<pad>",
    "<unk>",  # LLaMA-2 style vocabularies
)
"""Pad tokens tried in order when the tokenizer has none and ``pad_token`` is not given."""

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


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False).input_ids``, through the Rust tokenizer directly when there
    is one: the same ids, without building a Python BatchEncoding (attention masks, per-row conversions) that
    costs as much as the tokenization itself at 170k records."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend.encode_special_tokens = False  # what tokenizer(...) sets for split_special_tokens=False; it persists
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
