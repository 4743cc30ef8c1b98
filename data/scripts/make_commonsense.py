"""Write a small SYNTHETIC commonsense dataset in the LLM-Adapters layout into data/datasets/commonsense/.

    python data/scripts/make_commonsense.py [--out data/datasets/commonsense] [--seed 1234]

Output (same schema as the real sets, nothing copied from them):
    commonsense_170k.json          training records for all 8 tasks, shuffled
    dataset/<task>/test.json       held-out records, one directory per task

Every record is {"instruction", "input": "", "output": "the correct answer is <label>", "answer": "<label>"}
with the instruction in that task's published pattern (docs/DATA_FORMATS.md).

The world (seeded): 32 things in 4 categories (fruit, animal, tool, vehicle: what you eat, feed, build with,
ride), each with one of 4 colours, 2 sizes and 4 places, every value used equally often; rules that follow
from colour, size and place ("a green thing hides well in the grass"); people whose needs call for a category
("was hungry" -> fruit). data/scripts/make_tiny_llama.py pretrains the base model on these facts as plain text.

Questions come in kinds. A kind has a CLOSED answer key: its options are always the same, in the same order
("Answer1: red Answer2: blue Answer3: green Answer4: yellow"), and one fact of the subject picks the answer.
A tiny model can then answer by recalling a fact and mapping it to a label, which it learns in a minute of
fine-tuning; picking an option by reading shuffled options (in-context pointing) is what a ~1M-parameter
model did not learn in minutes of CPU training (measured), so no kind requires it.

    boolq          is the thing small / red / kept in the kitchen / something you can eat
    piqa           carry it in a pocket or with both hands (size); eat or ride it, feed or build with it (category)
    social_i_qa    what a person with a need wants to do; what a person does with a thing (3 answers)
    hellaswag      how a story ends (the thing's category, or the person's need)
    winogrande     where the person fetched the thing (place pair); whether it fit in a small box (size)
    ARC-Easy       one-hop facts: colour, place, kind of a thing
    ARC-Challenge  two hops: what you do with a thing (-> category -> use), what is true of it where it is
                   kept (-> place -> rule: smells of bread / gets wet when it rains / ...)
    openbookqa     colour rules ("open book" facts) applied to a thing outdoors

Held-out generalisation: for every kind a quarter of the subjects (things, or people for need questions),
balanced over answers, appear only in the test set, so a test question is about a fact the fine-tuning data
never asked about (the base model read it in pretraining). Labels are exactly balanced in every split
(chance = 1/num_choices). The output is bit-identical for a given seed: only random.Random is used and sets
are never iterated.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
TRAIN_PER_TASK = 408  # divisible by 2, 3 and 4: every label index gets exactly the same share
TEST_PER_TASK = 48

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")

# category -> (verb, third-person verb, its eight things)
CATEGORIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fruit": ("eat", "eats", ("apple", "banana", "cherry", "grape", "lemon", "peach", "plum", "pear")),
    "animal": ("feed", "feeds", ("cat", "dog", "horse", "rabbit", "goat", "duck", "sheep", "mouse")),
    "tool": ("build with", "builds with", ("hammer", "saw", "drill", "wrench", "shovel", "ladder", "rake", "axe")),
    "vehicle": ("ride", "rides", ("bike", "car", "boat", "bus", "truck", "train", "tram", "van")),
}
KIND = {"fruit": "a fruit", "animal": "an animal", "tool": "a tool", "vehicle": "a vehicle"}
COLOURS = ("red", "blue", "green", "yellow")
SIZES = ("small", "big")
PLACES = ("kitchen", "garden", "garage", "barn")
PEOPLE = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Ivy", "Jack", "Kate", "Liam")
# what a thing of each colour / size / place is like: the "open book" the base model reads in pretraining
COLOUR_RULES = {"red": "is easy to spot in the snow", "blue": "is hard to see against the sky",
                "green": "hides well in the grass", "yellow": "looks like the sun"}
SIZE_RULES = {"small": "fits in a pocket", "big": "is hard to carry"}
PLACE_RULES = {"kitchen": "smells of bread", "garden": "gets wet when it rains", "garage": "smells of oil",
               "barn": "smells of hay"}
# category -> situations that call for a thing of that category
NEEDS: dict[str, tuple[str, ...]] = {
    "fruit": ("was hungry", "skipped lunch"),
    "animal": ("felt lonely", "wanted a pet"),
    "tool": ("had a broken shelf", "wanted to build a box"),
    "vehicle": ("had to get to town", "was late for work"),
}
ACTIVITIES = ("A quiet morning", "Weekend plans", "After school", "A busy day")


@dataclass(frozen=True)
class Thing:
    """One object of the world and its facts."""

    name: str
    category: str
    colour: str
    size: str
    place: str

    @property
    def verb(self) -> str:
        return CATEGORIES[self.category][0]

    def attr(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class Person:
    """A person in a situation; the situation calls for one category."""

    name: str
    need: str
    category: str


Subject = Thing | Person


@dataclass(frozen=True)
class Kind:
    """A question family with a closed answer key: fixed options in fixed order, one fact picks the answer."""

    name: str
    stems: tuple[str, ...]  # str.format templates: {x} thing, {p} person, {n} need, {a} activity
    options: tuple[str, ...]
    answer: Callable[[Subject], int | None]  # option index for a subject, None when the kind does not apply
    about_people: bool = False


def build_world(seed: int = SEED) -> tuple[Thing, ...]:
    """Give every thing a colour, size and place, each value used equally often."""
    rng = random.Random(seed)
    names = [(cat, name) for cat, (_, _, things) in CATEGORIES.items() for name in things]
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(names))]
    sizes = [SIZES[i % len(SIZES)] for i in range(len(names))]
    places = [PLACES[i % len(PLACES)] for i in range(len(names))]
    for values in (colours, sizes, places):
        rng.shuffle(values)
    return tuple(Thing(n, c, col, s, p) for (c, n), col, s, p in zip(names, colours, sizes, places))


def build_people() -> tuple[Person, ...]:
    """Every person in every situation (the subjects of need questions)."""
    return tuple(Person(p, need, cat) for p in PEOPLE for cat, needs in NEEDS.items() for need in needs)


def _index(values: tuple[str, ...], value: str) -> int | None:
    return values.index(value) if value in values else None


def _category(*cats: str) -> Callable[[Subject], int | None]:
    return lambda s: _index(cats, s.category)


def _thing_attr(attr: str, values: tuple[str, ...]) -> Callable[[Subject], int | None]:
    return lambda s: _index(values, s.attr(attr)) if isinstance(s, Thing) else None


_CATS = tuple(CATEGORIES)
_WHOSE = ("the {x}", "{p}'s {x}")
KINDS: dict[str, tuple[Kind, ...]] = {
    "boolq": (  # option 0 = true, 1 = false; each kind asks one fixed property, so no comparison is needed
        Kind("small", tuple(f"is {w} small" for w in _WHOSE) + ("would the {x} fit in a pocket",), ("true", "false"),
             lambda s: 0 if s.size == "small" else 1),
        Kind("eat", tuple(f"can you eat {w}" for w in _WHOSE) + ("is the {x} a fruit",), ("true", "false"),
             lambda s: 0 if s.category == "fruit" else 1),
        Kind("red", tuple(f"is {w} red" for w in _WHOSE) + ("does the {x} have a red colour",), ("true", "false"),
             lambda s: 0 if s.colour == "red" else 1),
        Kind("kitchen", (*(f"is {w} kept in the kitchen" for w in _WHOSE), "would you find the {x} in the kitchen"),
             ("true", "false"), lambda s: 0 if s.place == "kitchen" else 1),
    ),
    "piqa": (
        Kind("size", ("{p} is holding the {x}. To take the {x} to the park, what should {p} do?",
                      "{p} found the {x}. To take the {x} to the park, what should {p} do?"),
             ("Put it in a pocket.", "Carry it with both hands."), _thing_attr("size", SIZES)),
        Kind("fruit_vehicle", ("How do you use the {x}?", "{p} has the {x}. How should {p} use it?"),
             ("Eat it.", "Ride it."), _category("fruit", "vehicle")),
        Kind("animal_tool", ("How do you use the {x}?", "{p} has the {x}. How should {p} use it?"),
             ("Feed it.", "Build with it."), _category("animal", "tool")),
    ),
    "social_i_qa": (
        Kind("need", ("{p} {n}. What will {p} want to do next?", "{p} {n}. What does {p} need?"),
             ("to eat something", "to pet an animal", "to ride somewhere"),
             lambda s: _index(("fruit", "animal", "vehicle"), s.category) if isinstance(s, Person) else None,
             about_people=True),
        Kind("use", ("{p} took the {x} from the {place}. What will {p} do with it?",
                     "{p} got the {x}. What will {p} do next?"),
             ("eat it", "feed it", "ride it"), lambda s: _index(("fruit", "animal", "vehicle"), s.category)
             if isinstance(s, Thing) else None),
    ),
    "hellaswag": (
        Kind("thing", ("{a}: {p} takes the {x} from the {place}. Then {p}",), ("eats it.", "feeds it.",
             "builds something with it.", "rides it."), lambda s: _index(_CATS, s.category) if isinstance(s, Thing)
             else None),
        Kind("need", ("{a}: {p} {n}. Now {p}",), ("eats a snack.", "feeds a pet.", "fixes things with a tool.",
             "drives off in a car."), lambda s: _index(_CATS, s.category) if isinstance(s, Person) else None,
             about_people=True),
    ),
    "winogrande": (
        Kind("kitchen_garden", ("{p} went to the _ to get the {x}.", "{p} found the {x} in the _."),
             ("kitchen", "garden"), _thing_attr("place", ("kitchen", "garden"))),
        Kind("garage_barn", ("{p} went to the _ to get the {x}.", "{p} found the {x} in the _."),
             ("garage", "barn"), _thing_attr("place", ("garage", "barn"))),
        Kind("box", ("{p} put the {x} into a small box and it _.", "The {x} _ when {p} packed it in a small box."),
             ("fit", "did not fit"), _thing_attr("size", SIZES)),
    ),
    "ARC-Easy": (
        Kind("colour", ("What colour is the {x}?", "{p} has a {x}. What colour is it?"), COLOURS,
             _thing_attr("colour", COLOURS)),
        Kind("place", ("Where is the {x} usually kept?", "{p} wants the {x}. Where is it kept?"),
             tuple(f"in the {p}" for p in PLACES), _thing_attr("place", PLACES)),
        Kind("kind", ("What kind of thing is the {x}?", "{p} spotted a {x}. What is it?"),
             tuple(KIND[c] for c in _CATS), _thing_attr("category", _CATS)),
    ),
    "ARC-Challenge": (
        Kind("use", ("What can you do with the {x}?", "{p} has a {x}. What can {p} do with it?"),
             tuple(f"{CATEGORIES[c][0]} it" for c in _CATS), _thing_attr("category", _CATS)),
        Kind("place_rule", ("Which of these is true of the {x}?", "{p} keeps the {x} where it belongs. "
                            "Which of these is true of it?"),
             tuple(f"it {PLACE_RULES[p]}" for p in PLACES), _thing_attr("place", PLACES)),
    ),
    "openbookqa": (
        Kind("colour_rule", ("What is true of the {x} outdoors?",
                             "{p} takes the {x} outside. What is true of it there?",
                             "{p} leaves the {x} outdoors. Which of these is true of it outdoors?"),
             tuple(f"it {COLOUR_RULES[c]}" for c in COLOURS), _thing_attr("colour", COLOURS)),
    ),
}
N_CHOICES = {"boolq": 2, "piqa": 2, "social_i_qa": 3, "hellaswag": 4, "winogrande": 2, "ARC-Challenge": 4,
             "ARC-Easy": 4, "openbookqa": 4}
LABEL = {"boolq": "", "piqa": "solution", "social_i_qa": "answer", "hellaswag": "ending", "winogrande": "option",
         "ARC-Challenge": "answer", "ARC-Easy": "answer", "openbookqa": "answer"}

# ---------------------------------------------------------------------------------------------- instructions


def instruction(task: str, stem: str, options: tuple[str, ...]) -> str:
    """The task's published instruction pattern around a question stem and its options."""
    o = options
    if task == "boolq":
        return (f"Please answer the following question with true or false, question: {stem}?\n\n"
                "Answer format: true/false")
    if task == "piqa":
        return (f"Please choose the correct solution to the question: {stem}\n\nSolution1: {o[0]}\n\n"
                f"Solution2: {o[1]}\n\nAnswer format: solution1/solution2")
    if task == "hellaswag":
        endings = " ".join(f"Ending{i + 1}: {e}" for i, e in enumerate(o))
        return (f"Please choose the correct ending to complete the given sentence: {stem}\n\n{endings}\n\n"
                "Answer format: ending1/ending2/ending3/ending4")
    if task == "winogrande":
        return ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                f"{stem}\n\nOption1: {o[0]} Option2: {o[1]} Answer format: option1/option2")
    answers = " ".join(f"Answer{i + 1}: {a}" for i, a in enumerate(o))
    labels = "/".join(f"answer{i + 1}" for i in range(len(o)))
    return f"Please choose the correct answer to the question: {stem}\n\n{answers}\n\nAnswer format: {labels}"


def _fill(stem: str, subject: Subject, rng: random.Random) -> str:
    """Fill a stem template for a thing or a person (need questions name the person of the subject)."""
    if isinstance(subject, Person):
        return stem.format(p=subject.name, n=subject.need, a=rng.choice(ACTIVITIES))
    return stem.format(x=subject.name, p=rng.choice(PEOPLE), place=subject.place, a=rng.choice(ACTIVITIES))


# ---------------------------------------------------------------------------------------------- splits


def split_subjects(subjects: list[Subject], answer: Callable[[Subject], int | None], rng: random.Random
                   ) -> tuple[dict[int, list[Subject]], dict[int, list[Subject]]]:
    """Per answer index, a quarter of the eligible subjects (at least one) for test, the rest for training."""
    test: dict[int, list[Subject]] = {}
    train: dict[int, list[Subject]] = {}
    for index in sorted({a for s in subjects if (a := answer(s)) is not None}):
        group = [s for s in subjects if answer(s) == index]
        rng.shuffle(group)
        cut = max(1, len(group) // 4)
        test[index], train[index] = group[:cut], group[cut:]
    return test, train


@dataclass
class _Pool:
    """Subjects of one kind in one split, by answer index."""

    kind: Kind
    by_answer: dict[int, list[Subject]]


def _draw(task: str, pools: list[_Pool], n: int, rng: random.Random, taken: set[str]) -> list[dict[str, str]]:
    """n records with new instructions; the label index cycles so labels are exactly balanced."""
    records: list[dict[str, str]] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 500 * n:
            raise RuntimeError(f"{task}: only {len(records)} of {n} distinct questions; add stems or subjects")
        index = len(records) % N_CHOICES[task]
        pool = rng.choice([p for p in pools if p.by_answer.get(index)])
        subject = rng.choice(pool.by_answer[index])
        text = instruction(task, _fill(rng.choice(pool.kind.stems), subject, rng), pool.kind.options)
        if text not in taken:
            taken.add(text)
            records.append(_record(text, label(task, index)))
    return records


def label(task: str, index: int) -> str:
    """The answer label of option ``index`` (0-based): "true"/"false" for boolq, else e.g. "answer2"."""
    return ("true", "false")[index] if task == "boolq" else f"{LABEL[task]}{index + 1}"


def _record(text: str, answer: str) -> dict[str, str]:
    return {"instruction": text, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def build_task(task: str, world: tuple[Thing, ...], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(test records, training records) of one task; test subjects are held out per kind."""
    taken: set[str] = set()
    test_pools, train_pools = [], []
    for kind in KINDS[task]:
        subjects = list(build_people()) if kind.about_people else list(world)
        test_split, train_split = split_subjects(subjects, kind.answer, rng)
        test_pools.append(_Pool(kind, test_split))
        train_pools.append(_Pool(kind, train_split))
    test = _draw(task, test_pools, TEST_PER_TASK, rng, taken)
    return test, _draw(task, train_pools, TRAIN_PER_TASK, rng, taken)


def build(seed: int = SEED) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Return (shuffled training records of all tasks, {task: test records})."""
    world = build_world(seed)
    rng = random.Random(seed + 1)
    train: list[dict[str, str]] = []
    tests: dict[str, list[dict[str, str]]] = {}
    for task in TASKS:
        tests[task], task_train = build_task(task, world, rng)
        train += task_train
    rng.shuffle(train)
    return train, tests


def _dump(records: list[dict[str, str]], path: Path) -> None:
    """A JSON list with one record per line: compact, valid JSON, readable diffs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets" / "commonsense")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    train, tests = build(args.seed)
    _dump(train, args.out / "commonsense_170k.json")
    for task, records in tests.items():
        _dump(records, args.out / "dataset" / task / "test.json")
    print(f"wrote {len(train)} training records and {sum(map(len, tests.values()))} test records to {args.out}")


if __name__ == "__main__":
    main()
