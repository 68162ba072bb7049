"""Reasoning tasks with verifiable answers: procedurally generated problems with step-by-step solutions (they
feed the pretraining corpus, SFT traces and GRPO prompts) and user tasks from JSONL.

A Task gives deterministic train / held-out splits: a problem belongs to the held-out split when a hash of its
prompt falls in one bucket of ten, so the splits are disjoint for any seed. Each task has a correctness
function `correct(completion, reference) -> float` (built-ins live in sobre.rewards; user tasks name theirs
as `module:function`).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import random
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

    def messages(self) -> list[dict]:
        """As a chat (SFT trace): the assistant reasons in <think> (DeepSeek-R1's format), then answers."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": f"<think>\n{self.reasoning}\n</think>\n\nAnswer: {self.answer}"}]


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


# ---- tasks: splits and correctness ----------------------------------------------------------------
def held_out(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode()).digest()[0] % 10 == 0


@dataclass
class Task:
    name: str
    correct: Callable[[str, str], float]  # (completion, reference answer) -> 1.0 correct / 0.0 wrong
    make: Callable[[random.Random], Problem] | None = None  # generated task
    rows: list[Problem] | None = None  # task from a file

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
            p = self.make(rng)
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
    """A built-in task by name, or a JSONL file of {"prompt", "answer"} rows (optional "reasoning", used for
    SFT traces) scored by `reward` ("module:function", default: numeric / exact answer match)."""
    if name in TASKS and reward is None:
        return TASKS[name]
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
    """"module:function" -> the function, called as fn(completion, reference_answer) -> float."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"reward must be given as module:function, got {spec!r}")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: {e}") from None
    if not callable(f):
        raise ValueError(f"reward {spec!r} is not callable")
    return f
