"""Procedurally generated reasoning problems with step-by-step solutions and checkable answers.

Each generator takes a random.Random and returns a Problem. They feed the pretraining corpus now and the
verifiable-reward tasks of the R1 stage later. Deterministic: the same seed gives the same problems.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


@dataclass
class Problem:
    prompt: str
    reasoning: str
    answer: str

    def text(self) -> str:
        """As a pretraining / SFT document: question, reasoning in <think>, then the answer."""
        return f"Question: {self.prompt}\n<think>\n{self.reasoning}\n</think>\nAnswer: {self.answer}"


def arithmetic(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    op = rng.choice("+-*")
    if op == "*":
        b = rng.randint(2, 99)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op == "+":
        steps = _column_addition(a, b)
    elif op == "-":
        tens = b // 10 * 10
        steps = f"{a} - {b}: take {tens} from {a} to get {a - tens}, then take {b % 10} to get {result}."
    else:
        tens, ones = b // 10 * 10, b % 10
        steps = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {result}."
    return Problem(f"What is {a} {op} {b}?", steps, str(result))


def _column_addition(a: int, b: int) -> str:
    steps, carry, place = [], 0, 1
    x, y = a, b
    while x or y or carry:
        d = x % 10 + y % 10 + carry
        steps.append(f"{place}s: {x % 10} + {y % 10}" + (f" + {carry}" if carry else "") + f" = {d}, write {d % 10}"
                     + (", carry 1" if d >= 10 else ""))
        carry, x, y, place = d // 10, x // 10, y // 10, place * 10
    return "\n".join(steps) + f"\nSo {a} + {b} = {a + b}."


def countdown(rng: random.Random) -> Problem:
    """Reach a target from given numbers with + - *; the generator builds the target from a known solution."""
    nums = [rng.randint(1, 25) for _ in range(rng.choice((3, 4)))]
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


def sorting(rng: random.Random) -> Problem:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]
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


def word_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, got, gave = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 30)
    per = rng.randint(2, 6)
    total = start + got * per - gave
    prompt = (f"{name} has {start} {item}. {name} buys {got} packs of {per} {item} and gives away {gave}. "
              f"How many {item} does {name} have now?")
    steps = f"{got} packs of {per} is {got} * {per} = {got * per}.\n{start} + {got * per} = {start + got * per}.\n" \
            f"{start + got * per} - {gave} = {total}."
    return Problem(prompt, steps, str(total))


GENERATORS = {"arithmetic": arithmetic, "countdown": countdown, "sorting": sorting, "word_problem": word_problem}


def problem_stream(seed: int = 0, kinds=tuple(GENERATORS)):
    """An endless, seeded stream of problems of the given kinds."""
    rng = random.Random(seed)
    while True:
        yield GENERATORS[rng.choice(kinds)](rng)


def problems(n: int, seed: int = 0, kinds=tuple(GENERATORS)) -> list[Problem]:
    return list(itertools.islice(problem_stream(seed, kinds), n))
