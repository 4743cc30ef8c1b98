"""A LLaMA-3-like byte tokenizer for the data tests: token id == byte value, the specials from 256, BOS added by
its post-processor, no pad token. Exact ids are then readable in the tests (``list(b"assistant")``)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|reserved_special_token_0|>"]
BOS = 256


def save_byte_tokenizer(directory: Path, specials: list[str] = SPECIALS, lowercase: bool = False) -> Path:
    """Save the tokenizer to ``directory`` and return it. ``lowercase`` breaks the round trip on purpose
    ("USER" comes back as "user"); ``specials[1]`` is the eos token."""
    from transformers import PreTrainedTokenizerFast

    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, shifted = {}, 0
    for b in range(256):  # GPT-2's byte -> unicode map, rebuilt
        chars[b] = chr(b) if b in printable else chr(256 + shifted)
        shifted += b not in printable
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.save_pretrained(str(directory))
    return directory
