"""Verifiable rewards (DeepSeek-R1's rule-based rewards): answer correctness, format, and an optional
overlong penalty (DAPO's soft punishment).

A completion is what the model wrote after the prompt; prompts end inside `<think>` (the chat template opens
it), so a well-formed completion is `reasoning </think> answer`. The final answer is the text after the last
`Answer:` in the part after `</think>`, or its last non-empty line.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections import Counter
from fractions import Fraction

END_THINK = "</think>"


def extract_answer(completion: str) -> str | None:
    """The final answer, or None when there is no `</think>` or nothing after it."""
    if END_THINK not in completion:
        return None
    tail = completion.rsplit(END_THINK, 1)[1]
    for special in ("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"):
        tail = tail.split(special)[0]
    if "Answer:" in tail:
        after = tail.rsplit("Answer:", 1)[1].strip()
        tail = after.splitlines()[0] if after else ""
    else:
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        tail = lines[-1] if lines else ""
    tail = tail.strip().rstrip(".").strip()
    return tail or None


def format_reward(completion: str, opened: bool = True) -> float:
    """1 for `reasoning </think> answer` (with `<think>` first when the prompt did not open it), else 0."""
    body = completion.lstrip()
    if not opened:
        if not body.startswith("<think>"):
            return 0.0
        body = body[len("<think>"):]
    if body.count(END_THINK) != 1 or "<think>" in body:
        return 0.0
    reasoning = body.split(END_THINK)[0]
    return float(bool(reasoning.strip()) and extract_answer(body) is not None)


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -1 at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return max(-1.0, (max_len - buffer - length) / buffer)


# ---- values of answers: numbers and + - * / expressions, evaluated exactly -------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))  # "0.1" is exactly 1/10
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError("not an arithmetic expression")


def value(text: str) -> Fraction | None:
    """Exact value of a number ("1,234", "-5", "2.50", "3/4") or a + - * / expression; None if it is neither.
    A trailing "= result" is ignored, so "3 + 4 = 7" has the value 7 of its left side."""
    text = text.split("=")[0].strip().replace("×", "*").replace("−", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    if not text or len(text) > 200:
        return None
    try:
        with warnings.catch_warnings():  # ("2or 3": Python warns of the literal, on stderr mid-progress-bar)
            warnings.simplefilter("ignore", SyntaxWarning)
            return _eval(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


# ---- correctness: fn(completion, reference answer) -> 1.0 or 0.0 -----------------------------------
def numeric_correct(completion: str, reference: str) -> float:
    """The answer has the reference's value (equivalent numbers or expressions count)."""
    ans, ref = extract_answer(completion), value(reference)
    return float(ans is not None and ref is not None and value(ans) == ref)


def countdown_correct(completion: str, reference: str) -> float:
    """The answer is an expression using exactly the reference's numbers (each once) with the same value."""
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    expr = ans.split("=")[0]
    if not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        return 0.0
    v = value(expr)
    return float(v is not None and v == value(reference) and Counter(numbers(expr.replace("-", " - "))) ==
                 Counter(numbers(reference.replace("-", " - "))))


def list_correct(completion: str, reference: str) -> float:
    """The answer lists the reference's numbers in the same order (any separators)."""
    ans = extract_answer(completion)
    return float(ans is not None and numbers(ans) == numbers(reference))


def answer_correct(completion: str, reference: str) -> float:
    """Default for user tasks: equal values when both are numbers or expressions, else equal text (case- and
    whitespace-insensitive)."""
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    a, r = value(ans), value(reference)
    if r is not None:
        return float(a == r)
    return float(" ".join(ans.lower().split()) == " ".join(reference.lower().split()))
