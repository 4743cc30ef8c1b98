"""Build data/checkpoints/tiny-llama/: a tiny LLaMA-3-style checkpoint in Hugging Face format, pretrained on synthetic text.

    python data/scripts/make_tiny_llama.py [--out data/checkpoints/tiny-llama] [--steps 1000]
    python data/scripts/make_tiny_llama.py --layers 12 --hidden 48 --intermediate 128 \
        --out data/checkpoints/tiny-llama-deep          # the deeper base of benchmarks/quality2.py

Only the shape differs between the two: the same corpus, tokenizer, seeds, pretraining steps and schedule.

It loads through the same code path as a real LLaMA-3 checkpoint::

    AutoModelForCausalLM.from_pretrained("data/checkpoints/tiny-llama", local_files_only=True)
    AutoTokenizer.from_pretrained("data/checkpoints/tiny-llama", local_files_only=True)

What it writes, and why:
    tokenizer.json, tokenizer_config.json   byte-level BPE trained here with `tokenizers` on the synthetic text
        with LLaMA-3's pre-tokenizer regex (digits split from letters: "answer2" is "answer" + "2"). The regular
        tokens come first; specials fill the vocabulary up to 1024 at the end, as in LLaMA-3:
        <|begin_of_text|> (bos, added automatically), <|end_of_text|> (eos, never added automatically),
        <|reserved_special_token_N|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>. NO pad token, as in
        LLaMA-3 (effilora_lightning.data.tokenizer.load_tokenizer picks <|reserved_special_token_0|>).
    config.json, generation_config.json     LlamaConfig: hidden 64, 4 layers, 4 query heads sharing 2 key/value
        heads (GQA), SwiGLU 192, untied input/output embeddings, rope_theta 500000, vocab 1024: 328k parameters,
        small enough that a minute of CPU fine-tuning runs about a thousand steps.
    model.safetensors                       fp32 weights (1.3 MB): CPU training and tests want fp32 anyway.

Pretraining (1000 steps of 32 x 128 tokens, 3 to 6 minutes on one CPU thread) reads documents about the world of
data/scripts/make_commonsense.py: profiles of every thing, consequences of the rules, general rules, comparisons,
stories of people with needs, facts asked and answered in prose ("what colour is the plum? the answer is
blue."), and multiple-choice quizzes in a plain format of their own with the choices in SHUFFLED order
("quiz: what colour is the plum? answer1 green, answer2 blue, ... the right one is answer2."; "true or false:
is the plum red? false."). It also reads pictures like those of data/scripts/make_llava.py described in words ("the
picture shows two red circles, at the top left and bottom right. how many circles are there? two.") and the
general facts the visual demo's text-only questions need.

Why quizzes and pictures: a real LLaMA-3 has written digits, "answer2", "true", "triangle" and "three" many
times before anyone fine-tunes it. A base that never produced a token keeps an untrained output row for it,
and a low-rank adapter cannot learn to aim at it in a CPU demo's few hundred steps (measured: LoRA on the
commonsense demo stayed at 6 % with the label tokens untrained, 55 % once they were trainable). It never
contains the Alpaca prompt, the instruction patterns of the test sets, "the correct answer is" or the test
sets' fixed answer keys (their options come in one fixed order per kind; a quiz shuffles them), so
fine-tuning still has to teach the format and the mapping from the recalled fact to the label.

Determinism: fixed seeds, torch.set_num_threads(1) and a single-threaded tokenizer trainer; the script prints a
sha256 per file, and rebuilding with the same library versions gives identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' trainer: one thread, one merge order
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_commonsense as world_rules  # noqa: E402
import make_llava as pictures  # noqa: E402
from make_commonsense import (  # noqa: E402
    CATEGORIES,
    COLOUR_RULES,
    COLOURS,
    KIND,
    NEEDS,
    PEOPLE,
    PLACE_RULES,
    PLACES,
    SIZE_RULES,
    SIZES,
    Thing,
)

SEED = 1234
REGULAR_VOCAB = 1000
VOCAB_SIZE = 1024
HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS = 64, 4, 192, 4, 2
SEQ_LEN = 128
BATCH_SIZE = 32
STEPS = 1000
LR = 3e-3
N_DOCS = 30000

# LLaMA-3's pre-tokenizer pattern (published in its tokenizer.json)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def special_tokens(count: int) -> list[str]:
    """``count`` specials appended after the regular vocabulary, in LLaMA-3's order (bos first)."""
    named = {6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
    tokens, reserved = [BOS, EOS], 0
    for slot in range(2, count):
        if slot in named:
            tokens.append(named[slot])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# ---------------------------------------------------------------------------------------------- corpus


def _profile(t: Thing, rng: random.Random) -> str:
    """All facts about one thing, in varied wording and order."""
    facts = [
        rng.choice([f"the {t.name} is {KIND[t.category]}.", f"the {t.name} is a kind of {t.category}."]),
        rng.choice([f"the {t.name} is {t.colour}.", f"the colour of the {t.name} is {t.colour}."]),
        rng.choice([f"the {t.name} is {t.size}.", f"the {t.name} is a {t.size} thing."]),
        rng.choice([f"the {t.name} is kept in the {t.place}.", f"you find the {t.name} in the {t.place}."]),
        rng.choice([f"you can {t.verb} the {t.name}.", f"people {t.verb} the {t.name}."]),
    ]
    rng.shuffle(facts)
    return " ".join(facts)


def _consequences(t: Thing, rng: random.Random) -> str:
    """What follows for one thing from the rules on colour, size and place, with the reason."""
    parts = [
        f"the {t.name} is {t.colour}, so it {COLOUR_RULES[t.colour]}.",
        f"the {t.name} is {t.size}, so it {SIZE_RULES[t.size]}.",
        f"the {t.name} is kept in the {t.place}, so it {PLACE_RULES[t.place]}.",
        f"the {t.name} is {KIND[t.category]}, so you can {t.verb} it.",
    ]
    rng.shuffle(parts)
    return " ".join(parts[: rng.choice((2, 3, 4))])


def _contrast(world: tuple[Thing, ...], rng: random.Random) -> str:
    """Two things compared on one attribute: what is and what is not the case."""
    a, b = rng.sample(world, 2)
    attr = rng.choice(("colour", "size", "place", "category"))
    va, vb = a.attr(attr), b.attr(attr)
    verb = "is kept in the" if attr == "place" else ("is a kind of" if attr == "category" else "is")
    if va == vb:
        return f"the {a.name} {verb} {va} and the {b.name} {verb} {vb} too."
    return f"the {a.name} {verb} {va}, not {vb}. the {b.name} {verb} {vb}, not {va}."


def _rules(rng: random.Random) -> str:
    """The general rules, a few at a time."""
    rules = ([f"a {c} thing {r}." for c, r in COLOUR_RULES.items()]
             + [f"a {s} thing {r}." for s, r in SIZE_RULES.items()]
             + [f"a thing kept in the {p} {r}." for p, r in PLACE_RULES.items()]
             + [f"you {CATEGORIES[c][0]} {KIND[c]}." for c in CATEGORIES])
    return " ".join(rng.sample(rules, 4))


def _qa(t: Thing, rng: random.Random) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Questions about one thing: (question, short answer, full answer, every possible short answer)."""
    x, yes_no = t.name, ("yes", "no")
    wrong = {a: rng.choice([v for v in values if v != t.attr(a)])
             for a, values in (("colour", COLOURS), ("size", SIZES), ("place", PLACES), ("category", tuple(KIND)))}
    fits = "yes" if t.size == "small" else "no"
    return [
        (f"what colour is the {x}?", t.colour, f"the {x} is {t.colour}.", COLOURS),
        (f"where is the {x} kept?", f"in the {t.place}", f"the {x} is kept in the {t.place}.",
         tuple(f"in the {p}" for p in PLACES)),
        (f"what kind of thing is the {x}?", KIND[t.category], f"the {x} is {KIND[t.category]}.",
         tuple(KIND.values())),
        (f"what can you do with the {x}?", f"{t.verb} it", f"you can {t.verb} it.",
         tuple(f"{v} it" for v, _, _ in CATEGORIES.values())),
        (f"is the {x} {t.colour}?", "yes", f"yes, the {x} is {t.colour}.", yes_no),
        (f"is the {x} {wrong['colour']}?", "no", f"no, the {x} is {t.colour}.", yes_no),
        (f"is the {x} {t.size}?", "yes", f"yes, the {x} is {t.size}.", yes_no),
        (f"is the {x} {wrong['size']}?", "no", f"no, the {x} is {t.size}.", yes_no),
        (f"is the {x} kept in the {t.place}?", "yes", f"yes, it is kept in the {t.place}.", yes_no),
        (f"is the {x} kept in the {wrong['place']}?", "no", f"no, it is kept in the {t.place}.", yes_no),
        (f"is the {x} {KIND[t.category]}?", "yes", f"yes, the {x} is {KIND[t.category]}.", yes_no),
        (f"is the {x} {KIND[wrong['category']]}?", "no", f"no, the {x} is {KIND[t.category]}.", yes_no),
        (f"can you {t.verb} the {x}?", "yes", f"yes, you can {t.verb} it.", yes_no),
        (f"would the {x} fit in a small box?", fits, f"{fits}, it is {t.size}.", yes_no),
        (f"what is true of the {x} outdoors?", f"it {COLOUR_RULES[t.colour]}", f"it {COLOUR_RULES[t.colour]}.",
         tuple(f"it {r}" for r in COLOUR_RULES.values())),
        (f"what is true of the {x} where it is kept?", f"it {PLACE_RULES[t.place]}", f"it {PLACE_RULES[t.place]}.",
         tuple(f"it {r}" for r in PLACE_RULES.values())),
    ]


def _questions(t: Thing, rng: random.Random) -> str:
    """Facts about one thing asked and answered in prose: free-text answers, sometimes after "the answer is"."""
    return " ".join(_answered(*entry, rng) for entry in rng.sample(_qa(t, rng), 3))


def _answered(question: str, short: str, full: str, values: tuple[str, ...], rng: random.Random) -> str:
    """A question answered at once, or after the possible answers are named ("red or blue or ..."), so the
    base model learns to recall a fact across intervening text that names the other values too."""
    style = rng.random()
    if style < 0.35:
        return f"{question} {full}"
    if style < 0.7:
        return f"{question} the answer is {short}."
    return f"{question} the choices are {' or '.join(values)}. the answer is {short}."


QUIZ_LABELS = {2: ("answer", "solution", "option", "ending"), 3: ("answer", "ending"), 4: ("answer", "ending")}


def _quiz(t: Thing, rng: random.Random) -> str:
    """A multiple-choice quiz in a plain format of its own: numbered choices in SHUFFLED order and the number
    of the right one ("option1 yes, option2 no. the right one is option2."), or a yes/no question answered
    true or false. A real base model has read many such quizzes; this one needs them to have ever produced
    the label tokens (the digits after answer/solution/option/ending, true, false) the fine-tuning format
    asks for. The order is shuffled, so the quiz never teaches the fine-tuning sets' fixed answer keys."""
    question, short, _, values = rng.choice(_qa(t, rng))
    if values == ("yes", "no") and rng.random() < 0.5:
        verdict = "true" if short == "yes" else "false"
        return f"true or false: {question} {verdict}."
    choices = list(values)
    rng.shuffle(choices)
    word = rng.choice(QUIZ_LABELS[len(choices)])
    listed = ", ".join(f"{word}{i} {c}" for i, c in enumerate(choices, 1))
    return f"quiz: {question} {listed}. the right one is {word}{choices.index(short) + 1}."


def _need_question(rng: random.Random) -> str:
    """What a person in a situation wants, asked and answered in prose."""
    person, cat = rng.choice(PEOPLE), rng.choice(tuple(NEEDS))
    return (f"{person} {rng.choice(NEEDS[cat])}. what did {person} want? {person} wanted to "
            f"{CATEGORIES[cat][0]} {KIND[cat]}.")


def _story(world: tuple[Thing, ...], rng: random.Random) -> str:
    """A person with a need uses a thing of the category that meets it."""
    person = rng.choice(PEOPLE)
    cat = rng.choice(tuple(NEEDS))
    t = rng.choice([x for x in world if x.category == cat])
    return (f"{person} {rng.choice(NEEDS[cat])}. {person} needed {KIND[cat]}, so {person} went to the {t.place} "
            f"to {t.verb} the {t.name}.")


def _picture(rng: random.Random) -> str:
    """A picture like those of data/scripts/make_llava.py described in words, then asked about in prose: the words
    its short answers use (shapes, colours, counts, sides) are ones the base model has already written."""
    shape, colour = rng.choice(pictures.SHAPES), rng.choice(list(pictures.COLOURS))
    where = rng.sample(pictures.QUADRANTS, rng.randint(1, 4))
    count, plural = pictures.NUMBERS[len(where)], shape + ("s" if len(where) > 1 else "")
    spots = " and ".join(f"{v} {h}" for v, h in where)
    qa = [(f"how many {shape}s are there?", count), ("how many shapes are in the picture?", count),
          (f"what color {'are the' if len(where) > 1 else 'is the'} {plural}?", colour),
          ("what shape is shown in the picture?", shape), (f"is there a {colour} {shape}?", "yes"),
          (f"is there a {rng.choice([c for c in pictures.COLOURS if c != colour])} {shape}?", "no"),
          (f"is there a {colour} {rng.choice([x for x in pictures.SHAPES if x != shape])}?", "no")]
    if len(where) == 1:
        qa += [(f"is the {shape} on the left or on the right?", where[0][1]),
               (f"is the {shape} at the top or at the bottom?", where[0][0])]
    asked = " ".join(f"{q} {a}." for q, a in rng.sample(qa, 2))
    return f"the picture shows {count} {colour} {plural}, at the {spots}. {asked}"


def _picture_facts(rng: random.Random) -> str:
    """General facts the visual-instruction demo's text-only questions ask about."""
    facts = ["a triangle has three sides.", "a square has four sides.", "a circle has no corners.",
             "a square has four corners.", "a triangle has three corners.", "blue and yellow make green.",
             "red and yellow make orange.", "red and blue make purple."]
    facts += [f"after {a} comes {b}." for a, b in zip(pictures.NUMBERS, pictures.NUMBERS[1:])]
    return " ".join(rng.sample(facts, 3))


def build_corpus(seed: int = SEED, n_docs: int = N_DOCS) -> list[str]:
    """Documents about the world (never in the Q/A format of the test sets)."""
    world = world_rules.build_world(world_rules.SEED)
    rng = random.Random(seed)
    makers = [lambda: _profile(rng.choice(world), rng), lambda: _profile(rng.choice(world), rng),
              lambda: _consequences(rng.choice(world), rng), lambda: _consequences(rng.choice(world), rng),
              lambda: _contrast(world, rng), lambda: _rules(rng), lambda: _story(world, rng),
              lambda: _questions(rng.choice(world), rng), lambda: _questions(rng.choice(world), rng),
              lambda: _need_question(rng), lambda: _quiz(rng.choice(world), rng),
              lambda: _quiz(rng.choice(world), rng), lambda: _picture(rng), lambda: _picture(rng),
              lambda: _picture_facts(rng)]
    return [rng.choice(makers)() for _ in range(n_docs)]


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaMA-3's pre-tokenizer, specials at the end, bos added by the post-processor."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=REGULAR_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # the small world runs out of merges before REGULAR_VOCAB; reserved specials fill the rest, as in LLaMA-3
    tok.add_special_tokens(special_tokens(VOCAB_SIZE - tok.get_vocab_size()))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=8192,
                                   clean_up_tokenization_spaces=False)


def tokenizer_texts(corpus: list[str]) -> list[str]:
    """What the BPE learns from: the corpus plus the training split's prompts (never the test split)."""
    train, _ = world_rules.build(world_rules.SEED)
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    prompts = [f"{preamble}\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}" for r in train]
    return corpus + prompts


# ---------------------------------------------------------------------------------------------- model


def model_config(tokenizer: PreTrainedTokenizerFast, layers: int = LAYERS, hidden: int = HIDDEN,
                 intermediate: int = INTERMEDIATE) -> LlamaConfig:
    if hidden % HEADS:
        raise ValueError(f"--hidden {hidden} must be a multiple of the {HEADS} attention heads.")
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )


def pack(corpus: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Concatenate <bos> doc <eos> ... and cut into rows of SEQ_LEN tokens."""
    stream: list[int] = []
    for ids in tokenizer(corpus, add_special_tokens=True)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    rows = len(stream) // SEQ_LEN
    return torch.tensor(stream[: rows * SEQ_LEN]).view(rows, SEQ_LEN)


def pretrain(model: LlamaForCausalLM, data: torch.Tensor, steps: int) -> None:
    """AdamW with linear warmup and cosine decay over random batches of packed rows."""
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    start = time.time()
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (BATCH_SIZE,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llama")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"decoder layers (default {LAYERS})")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size (default {HIDDEN})")
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE, help=f"SwiGLU width (default {INTERMEDIATE})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    start = time.time()

    corpus = build_corpus()
    tokenizer = train_tokenizer(tokenizer_texts(corpus))
    model = LlamaForCausalLM(model_config(tokenizer, args.layers, args.hidden, args.intermediate)).float()
    data = pack(corpus, tokenizer)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {data.numel():,} pretraining tokens")
    pretrain(model, data, args.steps)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    _mimic_llama3_tokenizer_config(args.out / "tokenizer_config.json")
    print(f"built {args.out} in {time.time() - start:.0f}s (sha256 below)")
    for path in sorted(args.out.iterdir()):
        print(f"{sha256(path)}  {path.name}")


def _mimic_llama3_tokenizer_config(path: Path) -> None:
    """Name the class as LLaMA-3 does (loads in transformers 4.x and 5.x alike)."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
