"""Build data/datasets/llava/: a small synthetic visual-instruction set in the LLaVA-1.5 layout.

    python data/scripts/make_llava.py [--out data/datasets/llava] [--seed 0]

What it writes:
    images/train_NNNN.png, images/test_NNNN.png   64 x 64 RGB scenes drawn with PIL: one to four copies of one
        shape (circle, square, triangle) in one colour (red, green, blue, yellow, purple, orange), each in its
        own quadrant, on a light grey background. Flat colours, no anti-aliasing: about 0.3 KB a file.
    llava_train.json, llava_test.json              JSON lists of
        {"id", "image" (relative to data/datasets/llava/, absent for text-only samples), "conversations": [...]}.
        Questions about colour, shape, count, position (single objects) and yes/no presence; one to three
        turns; `<image>` before or after the first question (the loader moves it to the start of the turn).
        One sample in eight is text-only (sides of shapes, mixing colours, counting), so text-only and image
        samples share batches. Answers are one word: a colour, a shape, a number word, yes/no, left/right,
        top/bottom. In the test file the reference answer is the last gpt turn.

The scene drawer (`draw_scene`) is imported by data/scripts/make_tiny_clip.py, which pretrains the tiny vision
tower on other scenes from the same distribution (a different seed), never on these test images.

Determinism: `random.Random(seed)` only, fixed drawing order, PNG written by PIL without metadata; a rebuild
with the same Pillow version gives identical bytes (the script prints a sha256 of every output).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
QUADRANTS: tuple[tuple[str, str], ...] = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
SHORT = "\nAnswer with one word."
SPLITS = {"train": (512, 64), "test": (128, 16)}  # (image samples, text-only samples)


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` copies of one shape in one colour, one per listed quadrant."""

    shape: str
    colour: str
    quadrants: tuple[int, ...]  # indices into QUADRANTS

    @property
    def count(self) -> int:
        return len(self.quadrants)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]) -> None:
    """One filled shape inside `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_scene(rng: random.Random) -> tuple[Image.Image, Scene]:
    """A random scene and its 64 x 64 image; each object sits, jittered, in its own 32 x 32 quadrant."""
    scene = Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        quadrants=tuple(sorted(rng.sample(range(4), rng.randint(1, 4)))),
    )
    grey = rng.randint(225, 250)
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for q in scene.quadrants:
        side = rng.randint(14, 20)
        x = (q % 2) * 32 + rng.randint(2, 30 - side)
        y = (q // 2) * 32 + rng.randint(2, 30 - side)
        _draw_shape(draw, scene.shape, (x, y, x + side, y + side), COLOURS[scene.colour])
    return image, scene


# ---------------------------------------------------------------------------------------------- questions


def _plural(scene: Scene) -> str:
    return scene.shape + ("s" if scene.count > 1 else "")


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    verb = "are the" if scene.count > 1 else "is the"
    return f"What color {verb} {_plural(scene)}?", scene.colour


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return rng.choice(["What shape is shown in the image?", "Which shape do you see?"]), scene.shape


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([f"How many {scene.shape}s are there?", "How many shapes are in the picture?"])
    return question, NUMBERS[scene.count]


def _ask_presence(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Half the time about the scene's own colour and shape (yes), else one attribute changed (no)."""
    colour, shape = scene.colour, scene.shape
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            colour = rng.choice([c for c in COLOURS if c != scene.colour])
        else:
            shape = rng.choice([s for s in SHAPES if s != scene.shape])
    answer = "yes" if (colour, shape) == (scene.colour, scene.shape) else "no"
    article = "an" if colour[0] in "aeiou" else "a"
    return f"Is there {article} {colour} {shape} in the image?", answer


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Only for single objects: left/right or top/bottom of its quadrant."""
    vertical, horizontal = QUADRANTS[scene.quadrants[0]]
    if rng.random() < 0.5:
        return f"Is the {scene.shape} on the left or on the right?", horizontal
    return f"Is the {scene.shape} at the top or at the bottom?", vertical


def _image_sample(sample_id: str, image_path: str, scene: Scene, rng: random.Random) -> dict:
    """One to three question/answer turns about a scene, `<image>` before or after the first question."""
    askers = [_ask_colour, _ask_shape, _ask_count, _ask_presence] + ([_ask_position] if scene.count == 1 else [])
    turns = []
    for i, ask in enumerate(rng.sample(askers, rng.choice([1, 1, 2, 3]))):
        question, answer = ask(scene, rng)
        question += SHORT if rng.random() < 0.3 else ""
        if i == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": image_path, "conversations": turns}


def _text_question(rng: random.Random) -> tuple[str, str]:
    """A question answerable without an image."""
    kind = rng.randrange(4)
    if kind == 0:
        shape = rng.choice(["triangle", "square"])
        return f"How many sides does a {shape} have?", "three" if shape == "triangle" else "four"
    if kind == 1:
        first, second, result = rng.choice([("blue", "yellow", "green"), ("red", "yellow", "orange"),
                                            ("red", "blue", "purple")])
        return f"What color do you get when you mix {first} and {second}?", result
    if kind == 2:
        n = rng.randint(0, 4)
        return f"What number comes after {NUMBERS[n]}?", NUMBERS[n + 1]
    shape, sides = rng.choice([("circle", "no"), ("square", "yes"), ("triangle", "no")])
    return f"Does a {shape} have four corners?", sides


def _text_sample(sample_id: str, rng: random.Random) -> dict:
    turns = []
    for _ in range(rng.choice([1, 1, 2])):
        question, answer = _text_question(rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "conversations": turns}


# ----------------------------------------------------------------------------------------------- writing


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build_split(split: str, out: Path, rng: random.Random) -> list[dict]:
    """Draw and save the split's images; return its samples, image and text-only interleaved."""
    n_images, n_text = SPLITS[split]
    samples = []
    for i in range(n_images):
        image, scene = draw_scene(rng)
        rel = f"images/{split}_{i:04d}.png"
        (out / rel).write_bytes(_png_bytes(image))
        samples.append(_image_sample(f"{split}-img-{i:04d}", rel, scene, rng))
    for i in range(n_text):
        samples.insert(rng.randrange(len(samples) + 1), _text_sample(f"{split}-txt-{i:04d}", rng))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets" / "llava")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    shutil.rmtree(args.out / "images", ignore_errors=True)
    (args.out / "images").mkdir(parents=True)
    rng = random.Random(args.seed)
    for split in SPLITS:
        samples = build_split(split, args.out, rng)
        (args.out / f"llava_{split}.json").write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    for name in ("llava_train.json", "llava_test.json"):
        print(f"{name}: sha256 {hashlib.sha256((args.out / name).read_bytes()).hexdigest()}")
    total = sum(p.stat().st_size for p in files)
    print(f"{len(files)} files, {total / 1e6:.2f} MB, all-files sha256 {digest}, {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
