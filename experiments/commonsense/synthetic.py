"""Synthetic commonsense data in the LLM-Adapters format, learnable by a tiny model.

A small made-up world of facts -- every *thing* belongs to one *kind*, and every kind
serves a few *purposes* ("a hammer is a tool", "a tool is used to fix a shelf") -- is
asked about in the eight tasks' own formats, instruction texts and answer words::

    {"instruction": "Please choose the correct solution to the question: how do you fix a shelf?\\n\\n"
                    "Solution1: use a plum\\n\\nSolution2: use a hammer\\n\\nAnswer format: solution1/solution2",
     "input": "", "output": "the correct answer is solution2", "answer": "solution2"}

The right option is always the one whose thing is of the kind the question points at.
To keep the embedded run learnable by a tiny random model in a couple of minutes on a
CPU, *where* the right option sits is itself a fact of the question: every purpose (and
every kind, for ARC-Easy) has a home slot, ``_slot(cue, n)``; the distractors fill the
other slots in a fresh random order. So a one-hop lookup (question cue -> answer label)
suffices, while a model that reads the options also gets it right. boolq's false
questions name a kind that nothing belongs to ("is a hammer a kind of cloud?"), so its
answer, too, follows from one word. Names, things, distractors and surface templates are
drawn afresh for the held-out sets (a test instruction never appears verbatim in
training); chance is 1/#options.

``write_synthetic(root)`` writes ``root/train.json`` (the commonsense_170k layout) and
``root/<task>/test.json`` for the eight tasks (the LLM-Adapters ``dataset/`` layout).
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass
from typing import Callable

from experiments.commonsense.tasks import TASKS, answer_sentence

# kind -> (things of that kind, purposes that call for that kind)
WORLD: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fruit": (("apple", "pear", "banana", "plum", "mango", "cherry"), ("make a snack", "bake a pie")),
    "tool": (("hammer", "saw", "drill", "wrench", "chisel", "pliers"), ("fix a shelf", "build a fence")),
    "animal": (("dog", "cat", "horse", "rabbit", "goat", "parrot"), ("feed a pet", "visit a farm")),
    "vehicle": (("car", "bus", "truck", "bicycle", "tram", "scooter"), ("travel to town", "carry a load")),
    "instrument": (("guitar", "piano", "drum", "violin", "flute", "trumpet"), ("play a song", "join a band")),
    "garment": (("coat", "scarf", "sweater", "jacket", "glove", "boot"), ("stay warm", "dress for snow")),
}
FALSE_KINDS = ("cloud", "planet", "number", "color", "river", "mountain")  # kinds nothing belongs to
NAMES = ("Alex", "Sam", "Robin", "Jordan", "Casey", "Taylor", "Morgan", "Riley", "Jamie", "Quinn")


@dataclass(frozen=True)
class Fact:
    thing: str  # the entity, e.g. "hammer"
    kind: str  # its kind, e.g. "tool"


def _things() -> list[Fact]:
    return [Fact(t, k) for k, (things, _) in WORLD.items() for t in things]


def _slot(cue: str, n: int) -> int:
    """The home slot (0-based) of the right option for a question cued by ``cue``, among ``n``."""
    cues = [p for _, (_, purposes) in WORLD.items() for p in purposes] + list(WORLD)
    return cues.index(cue) % n


def _options(rng: random.Random, kind: str, n: int, cue: str) -> tuple[list[str], int]:
    """``n`` things: one of ``kind`` at the cue's home slot, ``n-1`` of distinct other kinds shuffled around it."""
    right = rng.choice(WORLD[kind][0])
    others = rng.sample([k for k in WORLD if k != kind], n - 1)
    opts = [rng.choice(WORLD[k][0]) for k in others]
    i = _slot(cue, n)
    opts.insert(i, right)
    return opts, i


def _listing(prefix: str, items: list[str]) -> str:
    return "\n\n".join(f"{prefix}{i + 1}: {it}" for i, it in enumerate(items))


def _fmt(word: str, n: int) -> str:
    return "Answer format: " + "/".join(f"{word}{i + 1}" for i in range(n))


def _boolq(rng: random.Random) -> tuple[str, str]:
    fact = rng.choice(_things())
    kind = fact.kind if rng.random() < 0.5 else rng.choice(FALSE_KINDS)
    q = rng.choice(
        (
            "is a {t} a kind of {k}",
            "is the {t} a {k}",
            "can a {t} be called a {k}",
            "would you say that a {t} is a {k}",
            "does the {t} count as a {k}",
            "is it true that a {t} is a {k}",
            "should a {t} be called a {k}",
        )
    ).format(t=fact.thing, k=kind)
    instr = f"Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false"
    return instr, "true" if kind == fact.kind else "false"


def _purpose(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(list(WORLD))
    return kind, rng.choice(WORLD[kind][1])


def _piqa(rng: random.Random) -> tuple[str, str]:
    kind, goal = _purpose(rng)
    opts, i = _options(rng, kind, 2, goal)
    q = rng.choice(("how do you {g}?", "what is the best way to {g}?", "to {g}, what should you do?")).format(g=goal)
    verb = rng.choice(("use a", "take a", "get a"))
    sols = [f"{verb} {o}" for o in opts]
    instr = f"Please choose the correct solution to the question: {q}\n\n{_listing('Solution', sols)}\n\n{_fmt('solution', 2)}"
    return instr, f"solution{i + 1}"


def _social_i_qa(rng: random.Random) -> tuple[str, str]:
    kind, goal = _purpose(rng)
    opts, i = _options(rng, kind, 3, goal)
    name = rng.choice(NAMES)
    q = rng.choice(
        (
            "{n} wanted to {g}. What did {n} need?",
            "{n} was going to {g}. What will {n} look for?",
            "{n} asked a friend for help to {g}. What should the friend bring?",
        )
    ).format(n=name, g=goal)
    answers = [f"a {o}" for o in opts]
    instr = f"Please choose the correct answer to the question: {q}\n\n{_listing('Answer', answers)}\n\n{_fmt('answer', 3)}"
    return instr, f"answer{i + 1}"


def _hellaswag(rng: random.Random) -> tuple[str, str]:
    kind, goal = _purpose(rng)
    opts, i = _options(rng, kind, 4, goal)
    name = rng.choice(NAMES)
    ctx = rng.choice(("{n} wants to {g}. {n}", "{n} is getting ready to {g}. Then {n}")).format(n=name, g=goal)
    verb = rng.choice(("picks up the", "reaches for the", "grabs the"))
    endings = [f"{verb} {o}." for o in opts]
    label = goal.split()[0].capitalize() + " " + " ".join(goal.split()[1:])
    instr = (
        f"Please choose the correct ending to complete the given sentence: {label}: {ctx}\n\n"
        f"{_listing('Ending', endings)}\n\n{_fmt('ending', 4)}"
    )
    return instr, f"ending{i + 1}"


def _winogrande(rng: random.Random) -> tuple[str, str]:
    kind, goal = _purpose(rng)
    opts, i = _options(rng, kind, 2, goal)
    name = rng.choice(NAMES)
    s = rng.choice(
        (
            "{n} had to {g}, so {n} took the _ and not the other thing.",
            "To {g}, {n} chose the _ because it was the right thing.",
        )
    ).format(n=name, g=goal)
    instr = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{s}\n\n{_listing('Option', opts)}\n\n{_fmt('option', 2)}"
    )
    return instr, f"option{i + 1}"


def _arc(rng: random.Random, challenge: bool) -> tuple[str, str]:
    kind = rng.choice(list(WORLD))
    n = 5 if challenge and rng.random() < 0.2 else 4
    goal = rng.choice(WORLD[kind][1])
    opts, i = _options(rng, kind, n, goal if challenge else kind)
    if challenge:
        q = rng.choice(("Which of these would a person use to {g}?", "Which object helps most to {g}?")).format(g=goal)
    else:
        q = rng.choice(("Which of these is a {k}?", "Which one of the following is a {k}?")).format(k=kind)
    instr = f"Please choose the correct answer to the question: {q}\n\n{_listing('Answer', opts)}\n\n{_fmt('answer', n)}"
    return instr, f"answer{i + 1}"


def _openbookqa(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(list(WORLD))
    goal = rng.choice(WORLD[kind][1])
    opts, i = _options(rng, kind, 4, goal)
    q = rng.choice(
        ("A {k} is what you need to {g}. Which of these is one?", "People {g} with a {k}. What could they use?")
    ).format(k=kind, g=goal)
    instr = f"Please choose the correct answer to the question: {q}\n\n{_listing('Answer', opts)}\n\n{_fmt('answer', 4)}"
    return instr, f"answer{i + 1}"


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "social_i_qa": _social_i_qa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "ARC-Challenge": lambda rng: _arc(rng, True),
    "ARC-Easy": lambda rng: _arc(rng, False),
    "openbookqa": _openbookqa,
}


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One LLM-Adapters record (``instruction``, ``input``, ``output``, ``answer``) of ``task``."""
    instr, label = GENERATORS[task](rng)
    return {"instruction": instr, "input": "", "output": answer_sentence(task, label), "answer": label}


def make_splits(
    n_train_per_task: int = 400, n_test_per_task: int = 100, seed: int = 0, tasks: tuple[str, ...] = TASKS
) -> tuple[list[dict], dict[str, list[dict]]]:
    """``(train records, {task: test records})``; test instructions never occur in train."""
    if n_train_per_task < 1 or n_test_per_task < 1:
        raise ValueError("need at least one training and one test example per task")
    rng = random.Random(seed)
    train: list[dict] = []
    seen: set[str] = set()
    for task in tasks:
        for _ in range(n_train_per_task):
            ex = make_example(task, rng)
            seen.add(ex["instruction"])
            train.append(ex)
    rng.shuffle(train)
    tests: dict[str, list[dict]] = {}
    for task in tasks:
        out: list[dict] = []
        tries = 0
        while len(out) < n_test_per_task:
            ex = make_example(task, rng)
            tries += 1
            # boolq: alternate true/false so a constant guess scores 50% (true questions are
            # fewer, so the unseen-instruction filter would otherwise skew the set to false).
            want = ("true", "false")[len(out) % 2] if task == "boolq" else ex["answer"]
            if ex["instruction"] not in seen and ex["answer"] == want:
                seen.add(ex["instruction"])
                out.append(ex)
            elif tries > 100 * n_test_per_task:
                raise ValueError(f"could not draw {n_test_per_task} unseen {task} test examples")
        tests[task] = out
    return train, tests


def write_synthetic(root: str | pathlib.Path, **kwargs) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``root/train.json`` and ``root/<task>/test.json``; returns (train file, eval dir)."""
    root = pathlib.Path(root)
    train, tests = make_splits(**kwargs)
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(train, indent=1))
    for task, recs in tests.items():
        (root / task).mkdir(exist_ok=True)
        (root / task / "test.json").write_text(json.dumps(recs, indent=1))
    return root / "train.json", root


def corpus(records: list[dict]) -> list[str]:
    """All texts a tokenizer for these records must cover."""
    return [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in records]
