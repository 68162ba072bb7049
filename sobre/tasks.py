"""Reasoning tasks with verifiable answers: procedurally generated problems with step-by-step solutions (they
feed the pretraining corpus, SFT traces and GRPO prompts) and user tasks from JSONL.

A Task gives deterministic train / held-out splits: a problem belongs to the held-out split when a hash of its
prompt falls in one bucket of ten, so the splits are disjoint for any seed. Each task has a correctness
function `correct(completion, reference) -> float` (built-ins live in sobre.rewards; user tasks name theirs
as `module:function`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import rewards


@dataclass
class Problem:
    prompt: str
    reasoning: str
    answer: str

    def text(self) -> str:
        """As a pretraining document: question, reasoning in <think>, then the answer."""
        return f"Question: {self.prompt}\n<think>\n{self.reasoning}\n</think>\nAnswer: {self.answer}"

    def messages(self, think: bool = True) -> list[dict]:
        """As a chat (SFT trace): the assistant reasons in <think> (DeepSeek-R1's format), then answers; with
        think=False the thinking block is empty (DeepSeek's non-thinking answer: straight to the result)."""
        reasoning = f"\n{self.reasoning}\n" if think else "\n"
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": f"<think>{reasoning}</think>\n\nAnswer: {self.answer}"}]


def arithmetic(rng: random.Random, level: int = 2) -> Problem:
    """Level 1: two-digit + and -; 2: three-digit +, - and by-two-digit *; 3: four-digit, by-three-digit *."""
    hi = (99, 999, 9999)[level - 1]
    a, b = rng.randint(10, hi), rng.randint(10, hi)
    op = rng.choice("+-" if level == 1 else "+-*")
    if op == "*":
        b = rng.randint(2, (99, 99, 999)[level - 1])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op == "+":
        steps = _column_addition(a, b)
    elif op == "-":
        steps = _column_subtraction(a, b)
    else:
        tens, ones = b // 10 * 10, b % 10
        steps = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {result}."
    return Problem(f"What is {a} {op} {b}?", steps, str(result))


def _column_addition(a: int, b: int) -> str:
    """Column by column with carries; each line ends with the digits written so far (the newest in front), so
    the result is read off the last line instead of being reassembled from the columns."""
    steps, carry, place, digits = [], 0, 1, ""
    x, y = a, b
    while x or y or carry:
        d = x % 10 + y % 10 + carry
        digits = str(d % 10) + digits
        if x or y:
            steps.append(f"{place}s: {x % 10} + {y % 10}" + (f" + {carry}" if carry else "") + f" = {d}, "
                         f"write {d % 10}" + (", carry 1" if d >= 10 else "") + f". So far: {digits}")
        else:
            steps.append(f"{place}s: carry 1. So far: {digits}")
        carry, x, y, place = d // 10, x // 10, y // 10, place * 10
    return "\n".join(steps) + f"\nSo the sum is {a + b}."


def _column_subtraction(a: int, b: int) -> str:
    """Column by column with borrows, digits so far at the end of each line (leading zeros dropped only in the
    result); a smaller minus a larger number is the negated reverse difference."""
    if a < b:
        return f"{a} is less than {b}, so {a} - {b} = -({b} - {a}).\n" + \
            _column_subtraction(b, a).rsplit("\n", 1)[0] + f"\nSo the difference is {a - b}."
    steps, borrow, place, digits = [], 0, 1, ""
    x, y = a, b
    while x:
        top = x % 10 - borrow
        line = f"{place}s: {x % 10}" + (" - 1" if borrow else "") + f" - {y % 10}"
        borrow = int(top < y % 10)
        line += f", borrow 10: {top + 10} - {y % 10}" if borrow else ""
        d = top + 10 * borrow - y % 10
        digits = str(d) + digits
        steps.append(f"{line} = {d}, write {d}. So far: {digits}")
        x, y, place = x // 10, y // 10, place * 10
    return "\n".join(steps) + f"\nSo the difference is {a - b}."


def countdown(rng: random.Random, level: int = 2) -> Problem:
    """Reach a target from given numbers with + - *; the generator builds the target from a known solution.
    Level 1: three numbers up to 10; 2: three or four up to 25; 3: four or five up to 50."""
    count = {1: (3,), 2: (3, 4), 3: (4, 5)}[level]
    nums = [rng.randint(1, (10, 25, 50)[level - 1]) for _ in range(rng.choice(count))]
    order = nums[:]
    rng.shuffle(order)
    expr, value, steps = str(order[0]), order[0], []
    for n in order[1:]:
        op = rng.choice("+-*") if value * n < 1000 else rng.choice("+-")
        new = {"+": value + n, "-": value - n, "*": value * n}[op]
        steps.append(f"{value} {op} {n} = {new}")
        expr, value = f"({expr} {op} {n})", new
    prompt = f"Using the numbers {', '.join(map(str, nums))} once each with + - *, make {value}."
    return Problem(prompt, "\n".join(steps), expr[1:-1] if expr.startswith("(") else expr)


def sorting(rng: random.Random, level: int = 2) -> Problem:
    """Level 1: three to five numbers below 20; 2: four to eight below 100; 3: six to twelve below 1000."""
    lo, hi = {1: (3, 5), 2: (4, 8), 3: (6, 12)}[level]
    xs = [rng.randint(0, (19, 99, 999)[level - 1]) for _ in range(rng.randint(lo, hi))]
    reverse = rng.random() < 0.5
    out = sorted(xs, reverse=reverse)
    steps, rest = [], xs[:]
    for _ in range(len(xs)):
        pick = max(rest) if reverse else min(rest)
        steps.append(f"{'largest' if reverse else 'smallest'} of {rest} is {pick}")
        rest.remove(pick)
    way = "descending" if reverse else "ascending"
    return Problem(f"Sort {xs} in {way} order.", "\n".join(steps), " ".join(map(str, out)))


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles"]


def word_problem(rng: random.Random, level: int = 2) -> Problem:
    """Level 1: small numbers; 2: up to 60 items, 40 packs of up to 6; 3: up to 600, 90 packs of up to 12."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    i = level - 1
    start, got = rng.randint(5, (15, 60, 600)[i]), rng.randint(2, (10, 40, 90)[i])
    gave = rng.randint(1, (8, 30, 300)[i])
    per = rng.randint(2, (3, 6, 12)[i])
    total = start + got * per - gave
    prompt = (f"{name} has {start} {item}. {name} buys {got} packs of {per} {item} and gives away {gave}. "
              f"How many {item} does {name} have now?")
    steps = f"{got} packs of {per} is {got} * {per} = {got * per}.\n{start} + {got * per} = {start + got * per}.\n" \
            f"{start + got * per} - {gave} = {total}."
    return Problem(prompt, steps, str(total))


GENERATORS = {"arithmetic": arithmetic, "countdown": countdown, "sorting": sorting, "word_problem": word_problem}


def problem_stream(seed: int = 0, kinds=tuple(GENERATORS), levels=(1, 2)):
    """An endless, seeded stream of problems of the given kinds and levels."""
    rng = random.Random(seed)
    while True:
        kind = rng.choice(kinds)
        yield GENERATORS[kind](rng, rng.choice(levels))


def problems(n: int, seed: int = 0, kinds=tuple(GENERATORS)) -> list[Problem]:
    return list(itertools.islice(problem_stream(seed, kinds), n))


# ---- tasks: splits and correctness ----------------------------------------------------------------
def held_out(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode()).digest()[0] % 10 == 0


@dataclass
class Task:
    name: str
    correct: Callable[[str, str], float]  # (completion, reference answer) -> 1.0 correct / 0.0 wrong
    make: Callable[[random.Random, int], Problem] | None = None  # generated task
    rows: list[Problem] | None = None  # task from a file
    level: int = 2  # difficulty of a generated task: 1 easy, 2 default, 3 hard

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """n problems of the split ("train" or "test"), the same for the same seed. A file task gives a seeded
        sample of its rows (at most all of them)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        want, rng, out = split == "test", random.Random(f"{self.name}/{seed}"), []
        if self.rows is not None:
            rows = [p for p in self.rows if held_out(p.prompt) == want]
            return rng.sample(rows, min(n, len(rows)))
        for _ in range(1000 * n + 1000):
            p = self.make(rng, self.level)
            if held_out(p.prompt) == want:
                out.append(p)
                if len(out) == n:
                    return out
        raise ValueError(f"task {self.name}: could not draw {n} {split} problems")


TASKS = {
    "arithmetic": Task("arithmetic", rewards.numeric_correct, arithmetic),
    "countdown": Task("countdown", rewards.countdown_correct, countdown),
    "sorting": Task("sorting", rewards.list_correct, sorting),
    "word_problem": Task("word_problem", rewards.numeric_correct, word_problem),
}


def get_task(name: str, reward: str | None = None) -> Task:
    """A built-in task by name, with an optional difficulty level ("countdown:1", levels 1-3, default 2), or a
    JSONL file of {"prompt", "answer"} rows (optional "reasoning", used for SFT traces) scored by `reward`
    ("module:function", default: numeric / exact answer match); a built-in task given `reward` is scored by it
    instead of its own check."""
    base, _, level = name.partition(":")
    if base in TASKS:
        if level not in ("", "1", "2", "3"):
            raise ValueError(f"task {name!r}: the level after ':' must be 1, 2 or 3")
        task = dataclasses.replace(TASKS[base], name=name, level=int(level or 2)) if level else TASKS[base]
        return dataclasses.replace(task, correct=load_reward(reward)) if reward else task
    if not name.endswith(".jsonl"):
        raise ValueError(f"unknown task {name!r}: choose from {sorted(TASKS)} or give a .jsonl file")
    path, rows = Path(name), []
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rows.append(Problem(str(d["prompt"]), str(d.get("reasoning", "")), str(d["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: each line must be a JSON object with 'prompt' and 'answer' ({e})") \
                from None
    return Task(path.stem, load_reward(reward) if reward else rewards.answer_correct, rows=rows)


def load_reward(spec: str) -> Callable[[str, str], float]:
    """"module:function" -> the function, called as fn(completion, reference_answer) -> float. The module is looked
    for in the current directory too, as `python -m` would (the `sobre` script's own path holds only its bin/)."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"reward must be given as module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: {e}") from None
    if not callable(f):
        raise ValueError(f"reward {spec!r} is not callable")
    return f
