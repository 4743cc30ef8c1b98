"""Conversation templates: exact label masks for vicuna_v1 and llama3, bos once, image placeholders, errors.

The tokenizer here is byte-level with no merges: every ASCII character is one token whose id is its byte
value, so every expected position below can be written down by hand. Specials sit at 256.. as in LLaMA-3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from effilora_lightning.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    LLAMA3,
    VICUNA_V1,
    MismatchCounter,
    check_template,
    encode_conversation,
    encode_prompt,
    get_template,
    validate_conversation,
)
from effilora_lightning.data.tokenizer import load_tokenizer

BOS, EOS, SH, EH, EOT = 256, 257, 258, 259, 260
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|reserved_special_token_0|>"]
TINY_LLAMA = Path(__file__).resolve().parents[2] / "data" / "tiny-llama"


def byte_tokenizer(directory: Path, specials: list[str] = SPECIALS, lowercase: bool = False):
    """A LLaMA-3-like tokenizer (bos added by its post-processor, no pad) where token id == byte value."""
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
        tok.normalizer = normalizers.Lowercase()  # breaks the round trip: "USER" comes back as "user"
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=specials[1])
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


def b(text: str) -> list[int]:
    return list(text.encode())


def masked(text: str) -> list[int]:
    return [IGNORE_INDEX] * len(text.encode())


CONV = [
    {"from": "human", "value": "What color?\n<image>"},  # the image moves to the start of the turn
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Count?"},
    {"from": "gpt", "value": "two"},
]


def test_vicuna_exact_ids_and_labels(tok):
    enc = encode_conversation(CONV, VICUNA_V1, tok, num_images=1, sample_id="s1")
    head = VICUNA_V1.system + " USER: "
    turn1 = "\nWhat color? ASSISTANT:"
    turn2 = "USER: Count? ASSISTANT:"
    assert enc.input_ids == [BOS] + b(head) + [IMAGE_TOKEN_INDEX] + b(turn1) + b(" red") + [EOS] + b(turn2) \
        + b(" two") + [EOS]
    assert enc.labels == [IGNORE_INDEX] + masked(head) + [IGNORE_INDEX] + masked(turn1) + b(" red") + [EOS] \
        + masked(turn2) + b(" two") + [EOS]
    assert enc.input_ids.index(IMAGE_TOKEN_INDEX) == 1 + len(head)
    assert enc.mismatch is None


def test_llama3_exact_ids_and_labels(tok):
    enc = encode_conversation(CONV, LLAMA3, tok, num_images=1, sample_id="s1")
    system = [SH] + b("system") + [EH] + b("\n\n" + LLAMA3.system) + [EOT]
    user1 = [SH] + b("user") + [EH] + b("\n\n") + [IMAGE_TOKEN_INDEX] + b("\nWhat color?") + [EOT]
    user2 = [SH] + b("user") + [EH] + b("\n\nCount?") + [EOT]
    assistant = [SH] + b("assistant") + [EH] + b("\n\n")
    expected = [BOS] + system + user1 + assistant + b("red") + [EOT] + user2 + assistant + b("two") + [EOT]
    assert enc.input_ids == expected
    prefix = 1 + len(system) + len(user1) + len(assistant)
    labels = [IGNORE_INDEX] * prefix + b("red") + [EOT] + [IGNORE_INDEX] * (len(user2) + len(assistant)) \
        + b("two") + [EOT]
    assert enc.labels == labels
    assert enc.input_ids.index(IMAGE_TOKEN_INDEX) == 1 + len(system) + 4 + len("user")
    assert enc.mismatch is None


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_bos_exactly_once_even_when_text_contains_specials(tok, template):
    conv = [{"from": "human", "value": "<|begin_of_text|> hi <|eot_id|>"}, {"from": "gpt", "value": "<|end_of_text|>"}]
    enc = encode_conversation(conv, template, tok)
    assert enc.input_ids[0] == BOS and enc.input_ids.count(BOS) == 1
    assert enc.input_ids.count(EOS) == (1 if template is VICUNA_V1 else 0)  # only the template's end of turn
    assert enc.input_ids.count(EOT) == (0 if template is VICUNA_V1 else 3)  # system, user, reply
    assert enc.mismatch is None


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_one_placeholder_per_image_never_trained(tok, template):
    conv = [{"from": "human", "value": "A <image> and B <image>"}, {"from": "gpt", "value": "ok"}]
    enc = encode_conversation(conv, template, tok, num_images=2)
    positions = [i for i, t in enumerate(enc.input_ids) if t == IMAGE_TOKEN_INDEX]
    assert len(positions) == 2 and positions[1] == positions[0] + 2  # "<image>\n<image>\nA  and B"
    assert enc.input_ids[positions[0] + 1] == ord("\n")
    assert all(enc.labels[p] == IGNORE_INDEX for p in positions)


def test_text_only_sample_has_no_placeholder(tok):
    enc = encode_conversation([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], LLAMA3, tok)
    assert IMAGE_TOKEN_INDEX not in enc.input_ids
    assert [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX] == b("yo") + [EOT]


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_prompt_is_prefix_up_to_last_reply(tok, template):
    enc = encode_conversation(CONV, template, tok, num_images=1)
    prompt, answer = encode_prompt(CONV, template, tok, num_images=1)
    assert answer == "two"
    assert prompt == enc.input_ids[: len(prompt)]
    assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX
    end = b(" ASSISTANT:") if template is VICUNA_V1 else [SH] + b("assistant") + [EH] + b("\n\n")
    assert prompt[-len(end):] == end


@pytest.mark.parametrize(
    ("conv", "images", "message"),
    [
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], 0,
         "turn 1 is from 'human', expected 'gpt'"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], 0, "turn 0 is from 'gpt'"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}], 0,
         "ends on a human turn"),
        ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "b"}], 1, "2 <image> tokens but 1"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], 1, "1 image(s) but 0 <image>"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}], 1, "appears in a gpt turn"),
        ([], 0, "non-empty list"),
        ([{"from": "human"}, {"from": "gpt", "value": "b"}], 0, "turn 0 must be"),
    ],
)
def test_invalid_conversations_name_the_sample(conv, images, message):
    with pytest.raises(ValueError, match="sample 'bad-7'") as err:
        validate_conversation("bad-7", conv, images)
    assert message in str(err.value)


def test_template_needs_its_special_tokens(tmp_path):
    plain = byte_tokenizer(tmp_path, specials=["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])
    check_template(VICUNA_V1, plain)  # eos is all vicuna needs
    with pytest.raises(ValueError, match="<|start_header_id|>"):
        check_template(LLAMA3, plain)
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        get_template("chatml")


def test_mismatch_detected_counted_and_fatal_past_ratio(tmp_path):
    lower = byte_tokenizer(tmp_path, lowercase=True)
    enc = encode_conversation(CONV, VICUNA_V1, lower, num_images=1)
    assert enc.mismatch == (
        "at character 17 the ids decode to '<|begin_of_text|>a chat between a curious human and an ar', "
        "the template renders '<|begin_of_text|>A chat between a curious human and an ar'"
    )
    counter = MismatchCounter(split="train")
    for i in range(9):
        counter.add(f"ok-{i}", None)
    counter.add("bad", enc.mismatch)
    assert (counter.seen, counter.mismatched, counter.ratio) == (10, 1, 0.1)
    counter.raise_if_above(0.1)  # exactly at the threshold is tolerated
    with pytest.raises(RuntimeError, match=r"1 of 10 samples .*'bad'"):
        counter.raise_if_above(0.05)


@pytest.mark.skipif(not (TINY_LLAMA / "tokenizer.json").is_file(), reason="data/tiny-llama not built")
@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_tiny_llama_tokenizer_round_trips(template):
    real = load_tokenizer(TINY_LLAMA)
    enc = encode_conversation(CONV, template, real, num_images=1)
    assert enc.mismatch is None
    assert enc.input_ids.count(real.bos_token_id) == 1 and enc.input_ids[0] == real.bos_token_id
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    end = template.end_token(real)
    assert real.decode(trained) == (" red" + end + " two" + end if template is VICUNA_V1 else "red" + end + "two" + end)
