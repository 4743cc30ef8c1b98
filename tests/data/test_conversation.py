"""Conversation templates: exact label masks for vicuna_v1 and llama3, bos once, image placeholders, errors.

The tokenizer here is byte-level with no merges: every ASCII character is one token whose id is its byte
value, so every expected position below can be written down by hand. Specials sit at 256.. as in LLaMA-3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from byte_tokenizer import SPECIALS, save_byte_tokenizer

from effilora_lightning.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    LLAMA3,
    VICUNA_V1,
    MismatchCounter,
    check_template,
    encode_conversation,
    encode_conversations,
    encode_prompt,
    get_template,
    reference_turns,
    validate_conversation,
)
from effilora_lightning.data.tokenizer import load_tokenizer

BOS, EOS, SH, EH, EOT = 256, 257, 258, 259, 260
TINY_LLAMA = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "tiny-llama"


def byte_tokenizer(directory: Path, specials: list[str] = SPECIALS, lowercase: bool = False):
    """The byte tokenizer (``byte_tokenizer.save_byte_tokenizer``), loaded as the DataModules load theirs."""
    return load_tokenizer(save_byte_tokenizer(directory, specials, lowercase))


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
    # Only a sample whose message spells a special token goes segment by segment and is checked by decoding back;
    # a lowercasing tokenizer cannot give the text back there. Elsewhere its ids are its own (whole pieces).
    lower = byte_tokenizer(tmp_path, lowercase=True)
    assert encode_conversation(CONV, VICUNA_V1, lower, num_images=1).mismatch is None
    conv = [{"from": "human", "value": "Say <|eot_id|>"}, {"from": "gpt", "value": "ok"}]
    enc = encode_conversation(conv, VICUNA_V1, lower)
    assert enc.mismatch == (
        "at character 0 the ids decode to 'a chat between a curious user and an art', "
        "the template renders 'A chat between a curious user and an art'"
    )
    counter = MismatchCounter(split="train")
    for i in range(9):
        counter.add(f"ok-{i}", None)
    counter.add("bad", enc.mismatch)
    assert (counter.seen, counter.mismatched, counter.ratio) == (10, 1, 0.1)
    counter.raise_if_above(0.1)  # exactly at the threshold is tolerated
    with pytest.raises(RuntimeError, match=r"1 of 10 samples .*'bad'"):
        counter.raise_if_above(0.05)


@pytest.mark.skipif(not (TINY_LLAMA / "tokenizer.json").is_file(), reason="data/checkpoints/tiny-llama not built")
@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_tiny_llama_tokenizer_round_trips(template):
    real = load_tokenizer(TINY_LLAMA)
    enc = encode_conversation(CONV, template, real, num_images=1)
    assert enc.mismatch is None
    assert enc.input_ids.count(real.bos_token_id) == 1 and enc.input_ids[0] == real.bos_token_id
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    end = template.end_token(real)
    assert real.decode(trained) == (" red" + end + " two" + end if template is VICUNA_V1 else "red" + end + "two" + end)


# ----------------------------------------------------------------------------- the LLaVA-1.5 reference's rules

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


def test_vicuna_v1_is_llava_conv_vicuna_v1():
    assert VICUNA_V1.system == VICUNA_SYSTEM  # conv_llava_v1 says "human"; LLaVA-1.5 trains and evaluates with this


@pytest.mark.parametrize(("template", "expected"), [
    (VICUNA_V1, [BOS] + b(VICUNA_SYSTEM + " USER: ") + [IMAGE_TOKEN_INDEX] + b(" ASSISTANT:")),
    (LLAMA3, [BOS, SH] + b("system") + [EH] + b("\n\n" + LLAMA3.system) + [EOT, SH] + b("user") + [EH] + b("\n\n")
     + [IMAGE_TOKEN_INDEX, EOT, SH] + b("assistant") + [EH] + b("\n\n")),
], ids=["vicuna_v1", "llama3"])
def test_a_turn_that_is_only_an_image_has_no_newline(tok, template, expected):
    conv = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "a bus"}]
    prompt, _ = encode_prompt(conv, template, tok, num_images=1)
    assert prompt == expected  # reference: "USER: <image> ASSISTANT:" (preprocess_multimodal strips the turn)


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
def test_a_leading_gpt_turn_is_dropped(tok, template):
    lead = [{"from": "gpt", "value": "Hello! Ask me anything."}]
    assert encode_conversation(lead + CONV, template, tok, num_images=1) == encode_conversation(
        CONV, template, tok, num_images=1)
    assert encode_prompt(lead + CONV, template, tok, num_images=1) == encode_prompt(CONV, template, tok, num_images=1)
    assert reference_turns(lead + CONV) == (CONV, True) and reference_turns(CONV) == (CONV, False)


def test_llama3_trims_every_message_vicuna_keeps_them(tok):
    conv = [{"from": "human", "value": "  Please render. \n"}, {"from": "gpt", "value": " render. "}]
    assistant = [SH] + b("assistant") + [EH] + b("\n\n")
    assert encode_conversation(conv, LLAMA3, tok).input_ids == (  # official format: content | trim
        [BOS, SH] + b("system") + [EH] + b("\n\n" + LLAMA3.system) + [EOT, SH] + b("user") + [EH]
        + b("\n\nPlease render.") + [EOT] + assistant + b("render.") + [EOT])
    vicuna = encode_conversation(conv, VICUNA_V1, tok)
    assert vicuna.input_ids == [BOS] + b(VICUNA_SYSTEM + " USER:   Please render. \n ASSISTANT:  render. ") + [EOS]
    assert [t for t, lab in zip(vicuna.input_ids, vicuna.labels, strict=True) if lab != IGNORE_INDEX] \
        == b("  render. ") + [EOS]


# ------------------------------------------- the reference's ids and masks with LLaVA-1.5's kind of tokenizer

def _reference_prompt(conv: list[dict[str, str]]) -> str:
    """conv_vicuna_v1.get_prompt() after preprocess_multimodal, written out independently of our renderer."""
    text = VICUNA_SYSTEM + " "
    for i, turn in enumerate(conv):
        value = turn["value"]
        if i % 2 == 0 and "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        text += ("USER: " + value + " ") if i % 2 == 0 else ("ASSISTANT: " + value + "</s>")
    return text


def _reference_ids(text: str, tokenizer) -> list[int]:
    """llava.mm_utils.tokenizer_image_token: each piece between images tokenized on its own, later bos dropped."""
    chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
    return chunks[0] + [i for chunk in chunks[1:] for i in [IMAGE_TOKEN_INDEX, *chunk[1:]]]


def _reference_v1_labels(text: str, ids: list[int], tokenizer) -> list[int] | None:
    """llava.train.train.preprocess_v1's masking by measured lengths (the legacy offset included); None where
    those lengths do not add up and the reference would mask the whole sample (it depends on the vocabulary)."""
    target, cur = list(ids), 1
    target[:1] = [IGNORE_INDEX]
    for i, rou in enumerate(text.split("</s>")):
        if not rou:
            break
        head, _ = rou.split(" ASSISTANT: ")
        round_len = len(_reference_ids(rou, tokenizer))
        instruction_len = len(_reference_ids(head + " ASSISTANT: ", tokenizer)) - 2
        if i and not tokenizer.legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur: cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    return target if cur == len(ids) else None


def _prefix_labels(text: str, ids: list[int], tokenizer) -> list[int]:
    """Trained: from the end of the ids of the text up to each "ASSISTANT:" to the end of the ids of the text up
    to the reply's "</s>" (the ids of a prefix ending there are a prefix of the whole ids)."""
    labels, at = [IGNORE_INDEX] * len(ids), 0
    while (colon := text.find(" ASSISTANT:", at)) >= 0:
        start, end = colon + len(" ASSISTANT:"), text.index("</s>", colon) + len("</s>")
        first, stop = len(_reference_ids(text[:start], tokenizer)), len(_reference_ids(text[:end], tokenizer))
        labels[first:stop] = ids[first:stop]
        at = end
    return labels


SP_CONVERSATIONS = [
    ([{"from": "human", "value": "What color is the bus in the picture?\n<image>"},
      {"from": "gpt", "value": "The bus is red."},
      {"from": "human", "value": "How many dogs are there?"},
      {"from": "gpt", "value": "There are two dogs on the grass."}], 1),
    ([{"from": "human", "value": "Is it raining?"}, {"from": "gpt", "value": "No, the sky is clear and blue."},
      {"from": "human", "value": "Describe the image."},
      {"from": "gpt", "value": "A man rides a bike down a busy street."},
      {"from": "human", "value": "Is it raining?"}, {"from": "gpt", "value": "No."}], 0),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A man rides a bike."}], 1),
]


def test_vicuna_v1_with_a_sentencepiece_tokenizer_is_the_reference(sp_tokenizer):
    convs, images = [c for c, _ in SP_CONVERSATIONS], [n for _, n in SP_CONVERSATIONS]
    encoded = encode_conversations(convs, VICUNA_V1, sp_tokenizer, num_images=images)
    for conv, enc in zip(convs, encoded, strict=True):
        text = _reference_prompt(conv)
        ids = _reference_ids(text, sp_tokenizer)
        assert enc.mismatch is None
        assert enc.input_ids == ids
        assert enc.labels == _prefix_labels(text, ids, sp_tokenizer)
        reference = _reference_v1_labels(text, ids, sp_tokenizer)
        assert reference is not None or not sp_tokenizer.legacy  # legacy: the reference's lengths add up
        assert reference in (None, enc.labels)
        trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
        replies = [t["value"] for t in conv[1::2]]
        assert sp_tokenizer.decode(trained) == "".join(" " + r + "</s>" for r in replies).strip()


def test_vicuna_v1_with_the_llama3_tokenizer_is_the_reference(llama3_tokenizer):
    for conv, n in SP_CONVERSATIONS:
        text = _reference_prompt(conv)
        ids = _reference_ids(text.replace("</s>", "<|end_of_text|>"), llama3_tokenizer)
        enc = encode_conversation(conv, VICUNA_V1, llama3_tokenizer, num_images=n)
        assert enc.mismatch is None and enc.input_ids == ids
        trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
        assert llama3_tokenizer.decode(trained) == "".join(" " + t["value"] + "<|end_of_text|>" for t in conv[1::2])


def test_llama3_template_with_the_llama3_tokenizer_is_the_whole_rendering(llama3_tokenizer):
    tok3 = llama3_tokenizer
    conv, n = SP_CONVERSATIONS[0]
    conv = [dict(t, value=t["value"] + " ") for t in conv]  # trailing spaces: trimmed
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    text = header.format("system") + LLAMA3.system + "<|eot_id|>"
    for i, turn in enumerate(conv):
        value = turn["value"].strip()
        if i % 2 == 0 and "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        text += header.format("user" if i % 2 == 0 else "assistant") + value + "<|eot_id|>"
    enc = encode_conversation(conv, LLAMA3, tok3, num_images=n)
    assert enc.mismatch is None and enc.input_ids == _reference_ids(text, tok3)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    eot = tok3.convert_tokens_to_ids("<|eot_id|>")
    assert trained == [i for t in conv[1::2] for i in [*tok3(t["value"].strip(), add_special_tokens=False).input_ids,
                                                        eot]]


def _pieces_from_segments(segments):
    """What the whole-piece path needs, written from ``render``'s segments: the text between images, one
    trained range per trainable segment, and each special's span."""
    pieces = [("", [], [])]
    for seg in segments:
        if seg.kind == "image":
            pieces.append(("", [], []))
            continue
        text, trained, specials = pieces[-1]
        start, text = len(text), text + seg.text
        trained += [(start, len(text))] if seg.trainable else []
        specials += [(start, len(text), seg.text)] if seg.kind == "special" else []
        pieces[-1] = (text, trained, specials)
    return pieces


PIECE_SHAPES = [
    CONV,
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": " a "}],
    [{"from": "human", "value": "a <image> b <image>"}, {"from": "gpt", "value": "x"},
     {"from": "human", "value": "  "}, {"from": "gpt", "value": ""}],
    [{"from": "human", "value": "says <|eot_id|> and </s>"}, {"from": "gpt", "value": "<|start_header_id|>"}],
    [{"from": "human", "value": "é😀\n"}, {"from": "gpt", "value": "\n\nok\n"}] * 3,
]


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3], ids=lambda t: t.name)
@pytest.mark.parametrize("conv", PIECE_SHAPES)
def test_render_pieces_are_the_pieces_of_render(tok, template, conv):
    """The fast path setup uses (render_pieces) cuts the very text render's segments spell, with the same
    trained ranges and specials: images mid-turn, empty and whitespace messages, special-token text in
    messages, multi-byte characters, many turns."""
    from effilora_lightning.data.conversation_render import render, render_pieces

    want = _pieces_from_segments(render(conv, template, tok))
    assert [tuple(p) for p in render_pieces(conv, template, tok)] == want
