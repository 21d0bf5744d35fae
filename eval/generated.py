"""Tasks generated here, deterministically, in BIG-bench's record shape (`input`, `target`, `targets`, and for multiple
choice `choices` + `label`): arithmetic, SI unit conversion, navigation and object counting.

Why generated: these families are programmatic in BIG-bench itself, and the package index no longer serves the
`bigbench==1.0.0` sdist that held its JSON (it answers with 0.0.1, which has no task data), so a fresh clone cannot
fetch them. A fixed seed per task makes every machine write byte-identical files (a test pins their digests).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Record = dict[str, Any]
EXAMPLES = 1000  # per task; suites score the first `limit` and draw few-shot examples from the rest


def _rng(task: str) -> random.Random:
    return random.Random(f"cascade-eval:{task}:1")


def _multiple_choice(rng: random.Random, right: str, wrong: list[str], n: int = 4) -> tuple[list[str], int]:
    """`right` and n-1 distinct wrong answers, shuffled; returns (choices, index of the right one)."""
    picked = [w for w in dict.fromkeys(wrong) if w != right][: n - 1]
    choices = [right, *picked]
    rng.shuffle(choices)
    return choices, choices.index(right)


def _add_new(rows: list[Record], record: Record) -> None:
    """Append unless the question was asked already (a repeat could serve as its own few-shot example)."""
    if all(r["input"] != record["input"] for r in rows):
        rows.append(record)


def _arithmetic(task: str, digits: int, op: str) -> list[Record]:
    rng, top = _rng(task), 10**digits
    rows: list[Record] = []
    seen: set[tuple[int, int]] = set()
    while len(rows) < min(EXAMPLES, top * top):  # distinct questions: a repeat could be its own few-shot example
        a, b = rng.randrange(top), rng.randrange(top)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        i = len(rows)
        value = a + b if op == "plus" else a * b
        near = [value + d for d in (1, -1, 2, -2, 10, -10, 11, -9)] + [rng.randrange(2 * top if op == "plus"
                                                                                    else top * top)]
        rng.shuffle(near)
        choices, label = _multiple_choice(rng, str(value), [str(v) for v in near if v >= 0])
        rows.append({"id": i, "input": f"What is {a} {op} {b}?", "target": str(value), "targets": [str(value)],
                     "choices": choices, "label": label})
    return rows


PREFIXES = {"k": 3, "h": 2, "da": 1, "": 0, "d": -1, "c": -2, "m": -3}
UNITS = {"m": "metres", "g": "grams", "L": "litres", "N": "newtons", "J": "joules", "W": "watts", "s": "seconds"}


def _quantity(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros: 23.50 -> 23.5, 2E+3 -> 2000."""
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def unit_conversion() -> list[Record]:
    """"23.5 daN expressed in units of N is" -> "235 N" among the same digits at other powers of ten."""
    rng = _rng("unit_conversion")
    rows: list[Record] = []
    while len(rows) < EXAMPLES:
        i = len(rows)
        unit = rng.choice(list(UNITS))
        src, dst = rng.sample(list(PREFIXES), 2)
        value = Decimal(rng.randrange(1, 1000)) / Decimal(10)
        shift = PREFIXES[src] - PREFIXES[dst]
        right = value.scaleb(shift)
        wrong = [value.scaleb(shift + d) for d in (1, -1, 2, -2, 3, -3)]
        rng.shuffle(wrong)
        choices, label = _multiple_choice(rng, f"{_quantity(right)} {dst}{unit}",
                                          [f"{_quantity(w)} {dst}{unit}" for w in wrong])
        _add_new(rows, {"id": i, "input": f"{_quantity(value)} {src}{unit} expressed in units of {dst}{unit} is",
                     "target": choices[label], "targets": [choices[label]], "choices": choices, "label": label})
    return rows


MOVES = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}


def _chunks(direction: str, distance: int, rng: random.Random) -> list[tuple[str, int]]:
    """`distance` steps in `direction` as moves of 1-9 steps."""
    moves = []
    while distance > 9:
        n = rng.randint(1, 9)
        moves.append((direction, n))
        distance -= n
    return [*moves, (direction, distance)] if distance else moves


def navigate() -> list[Record]:
    """BBH's "always face forward" navigation: do these steps return to the start? Half the answers are Yes."""
    rng = _rng("navigate")
    rows: list[Record] = []
    while len(rows) < EXAMPLES:
        i = len(rows)
        back = i % 2 == 0
        while True:
            steps = [(rng.choice(list(MOVES)), rng.randint(1, 9)) for _ in range(rng.randint(2, 4))]
            x = sum(MOVES[d][0] * n for d, n in steps)
            y = sum(MOVES[d][1] * n for d, n in steps)
            if back:  # close the path in moves of 1-9 steps like every other (a 14 would give the answer away)
                closing = _chunks("left" if x > 0 else "right", abs(x), rng)
                closing += _chunks("backward" if y > 0 else "forward", abs(y), rng)
                rng.shuffle(closing)
                steps += closing
                if closing and len(steps) <= 7:  # no longer than an open path can be
                    break
            else:  # about as many moves as a closed path has, so length says little
                steps += [(rng.choice(list(MOVES)), rng.randint(1, 9)) for _ in range(rng.randint(1, 3))]
                if sum(MOVES[d][0] * n for d, n in steps) or sum(MOVES[d][1] * n for d, n in steps):
                    break
        text = " ".join(f"Take {n} step{'s' if n > 1 else ''} {d}." for d, n in steps)
        answer = "Yes" if back else "No"
        _add_new(rows, {"id": i, "input": f"Always face forward. {text}", "target": answer, "targets": [answer],
                     "choices": ["Yes", "No"], "label": 0 if back else 1})
    return rows


THINGS = {
    "fruits": ["apple", "banana", "orange", "peach", "plum", "grape", "strawberry", "raspberry", "nectarine"],
    "vegetables": ["carrot", "potato", "onion", "cabbage", "lettuce head", "stalk of celery", "yam", "head of garlic"],
    "animals": ["cat", "dog", "rabbit", "goat", "cow", "pig", "duck", "chicken", "fish", "mouse", "snake"],
    "musical instruments": ["piano", "violin", "flute", "trumpet", "drum", "clarinet", "trombone", "accordion"],
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _plural(thing: str) -> str:
    head, _, rest = thing.partition(" of ")
    word = head + ("es" if head.endswith(("sh", "ch", "s", "x")) or head in ("potato", "tomato") else "s")
    if head.endswith("y") and head[-2] not in "aeiou":
        word = head[:-1] + "ies"
    if head in ("mouse", "fish"):
        word = {"mouse": "mice", "fish": "fish"}[head]
    return f"{word} of {rest}" if rest else word


def object_counting() -> list[Record]:
    """BBH-style counting: "I have a goat, two pianos, and a cat. How many animals do I have?" (others distract)."""
    rng = _rng("object_counting")
    rows: list[Record] = []
    while len(rows) < EXAMPLES:
        i = len(rows)
        kind = rng.choice(list(THINGS))
        other = rng.choice([k for k in THINGS if k != kind])
        items = [(t, kind) for t in rng.sample(THINGS[kind], rng.randint(2, 5))]
        items += [(t, other) for t in rng.sample(THINGS[other], rng.randint(0, 2))]
        rng.shuffle(items)
        counts = [rng.choice((1, 1, 1, 2, 3)) for _ in items]
        said = [f"{'an' if t[0] in 'aeiou' else 'a'} {t}" if n == 1 else f"{NUMBER_WORDS[n]} {_plural(t)}"
                for (t, _), n in zip(items, counts, strict=True)]
        listing = ", ".join(said[:-1]) + f", and {said[-1]}" if len(said) > 2 else " and ".join(said)
        total = sum(n for (_, k), n in zip(items, counts, strict=True) if k == kind)
        _add_new(rows, {"id": i, "input": f"I have {listing}. How many {kind} do I have?", "target": str(total),
                     "targets": [NUMBER_WORDS[total], str(total)]})
    return rows


GENERATORS: dict[str, Callable[[], list[Record]]] = {
    "arithmetic_1_digit_addition": lambda: _arithmetic("arithmetic_1_digit_addition", 1, "plus"),
    "arithmetic_2_digit_addition": lambda: _arithmetic("arithmetic_2_digit_addition", 2, "plus"),
    "arithmetic_2_digit_multiplication": lambda: _arithmetic("arithmetic_2_digit_multiplication", 2, "times"),
    "unit_conversion": unit_conversion,
    "navigate": navigate,
    "object_counting": object_counting,
}
