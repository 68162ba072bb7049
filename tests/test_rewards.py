"""Verifiable rewards: answer parsing edge cases, equivalence, format, overlong penalty; task splits; user tasks."""

import json
import sys
import warnings

import pytest

from sobre.rewards import (
    answer_correct,
    countdown_correct,
    extract_answer,
    format_reward,
    list_correct,
    numeric_correct,
    overlong_penalty,
    value,
)
from sobre.tasks import TASKS, _column_addition, _column_subtraction, get_task


def done(answer, reasoning="some steps"):
    return f"{reasoning}\n</think>\n\nAnswer: {answer}<｜end▁of▁sentence｜>"


def test_extract_answer_edge_cases():
    assert extract_answer(done("19")) == "19"
    assert extract_answer("no closing tag, Answer: 19") is None  # reasoning never closed
    assert extract_answer("steps</think>") is None  # nothing after it
    assert extract_answer("steps</think>\n\nAnswer:   ") is None
    assert extract_answer("a</think>b</think>\nthe result is\n42.\n") == "42"  # last line, after the last tag
    assert extract_answer("x</think>Answer: 3 Answer: 4") == "4"
    assert extract_answer("x</think>\nAnswer: 7\nmore text") == "7"


def test_values_and_equivalence():
    assert value("1,234") == 1234 and value("3/4") == value("0.75") and value("0.1") == value("1/10")
    assert value("(2 + 3) * 4") == 20 and value("-5") == -5 and value("3 + 4 = 7") == 7
    for bad in ("", "abc", "2 ** 99999", "__import__('os')", "1/0", "(" * 300, "2or 3"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert value(bad) is None
        assert not caught, caught[0].message  # ("2or 3": no SyntaxWarning on stderr either)
    assert numeric_correct(done("19.0"), "19") == 1.0
    assert numeric_correct(done("12 + 7"), "19") == 1.0  # an equivalent expression counts
    assert numeric_correct(done("20"), "19") == 0.0
    assert numeric_correct("19", "19") == 0.0  # no </think>: not an answer


def test_countdown_needs_the_same_numbers_and_value():
    ref = "(4 + 5) * 3"
    assert countdown_correct(done("3 * (5 + 4)"), ref) == 1.0
    assert countdown_correct(done("3 * (5 + 4) = 27"), ref) == 1.0
    assert countdown_correct(done("27"), ref) == 0.0  # the target alone uses none of the numbers
    assert countdown_correct(done("9 * 3"), ref) == 0.0  # 9 is not one of the numbers
    assert countdown_correct(done("(4 + 5) * 3 + 0"), ref) == 0.0  # extra number
    assert countdown_correct(done("import os"), ref) == 0.0
    assert list_correct(done("1, 2, 3"), "1 2 3") == 1.0 and list_correct(done("[3 2 1]"), "1 2 3") == 0.0


def test_format_reward_and_overlong_penalty():
    assert format_reward(done("5")) == 1.0
    assert format_reward("</think>Answer: 5") == 0.0  # empty reasoning
    assert format_reward("a</think>b</think>Answer: 5") == 0.0  # two closing tags
    assert format_reward("a<think>b</think>Answer: 5") == 0.0  # nested opening tag
    assert format_reward("reasoning without end") == 0.0
    assert format_reward("<think>r</think>Answer: 5", opened=False) == 1.0
    assert format_reward("r</think>Answer: 5", opened=False) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0 and overlong_penalty(90, 100, 20) == -0.5
    assert overlong_penalty(100, 100, 20) == -1.0 and overlong_penalty(100, 100, 0) == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_deterministic_disjoint_and_solvable(name):
    task = TASKS[name]
    train, test = task.problems("train", 300), task.problems("test", 40)
    assert [p.prompt for p in task.problems("test", 40)] == [p.prompt for p in test]
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert [p.prompt for p in task.problems("test", 40, seed=1)] != [p.prompt for p in test]
    for p in test[:10]:  # the reference solution is correct under the task's own reward
        assert task.correct(done(p.answer, p.reasoning), p.answer) == 1.0
    with pytest.raises(ValueError, match="split"):
        task.problems("val", 1)


def test_user_task_from_jsonl_with_pluggable_reward(tmp_path, monkeypatch):
    rows = [{"prompt": f"Capital of country {i}?", "answer": f"City {i}"} for i in range(40)]
    path = tmp_path / "capitals.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(str(path))
    train, test = task.problems("train", 100), task.problems("test", 100)
    assert len(train) + len(test) == 40 and not {p.prompt for p in train} & {p.prompt for p in test}
    assert task.correct(done("city 0"), "City 0") == 1.0 == answer_correct(done("City  0"), "City 0")
    (tmp_path / "myreward.py").write_text("def half(completion, answer):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_task(str(path), "myreward:half").correct("anything", "x") == 0.5
    scored = get_task("countdown:1", "myreward:half")  # a built-in task scored by the given reward instead
    assert scored.correct("anything", "x") == 0.5 and scored.problems("train", 3) == get_task(
        "countdown:1").problems("train", 3) and get_task("countdown:1").correct("anything", "x") == 0.0
    sys.modules.pop("myreward", None)
    with pytest.raises(ValueError, match="module:function"):
        get_task(str(path), "myreward")
    with pytest.raises(ValueError, match="nothere"):
        get_task(str(path), "myreward:nothere")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        get_task(str(bad))
    # a reward module in the current directory, as the `sobre` script runs (its sys.path holds neither '' nor cwd)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "localreward.py").write_text("def third(completion, answer):\n    return 1 / 3\n")
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setattr(sys, "path", [x for x in sys.path if x not in ("", str(tmp_path / "here"))])
    assert get_task("countdown", "localreward:third").correct("anything", "x") == pytest.approx(1 / 3)
    sys.modules.pop("localreward", None)


@pytest.mark.parametrize("a,b", [(72, 49), (99, 1), (5, 7), (98, 93), (57, 72), (100, 1), (1234, 987), (10, 10)])
def test_column_traces_read_the_result_off_the_last_line(a, b):
    """Every column line carries the digits written so far; the last of them is the result (leading zeros aside)."""
    for op, result, trace in (("+", a + b, _column_addition(a, b)), ("-", a - b, _column_subtraction(a, b))):
        lines = trace.splitlines()
        so_far = [line.rsplit("So far: ", 1)[1] for line in lines if "So far: " in line]
        assert all(later.endswith(earlier) and len(later) == len(earlier) + 1
                   for earlier, later in zip(so_far, so_far[1:])), trace
        assert int(so_far[-1]) == abs(result) and lines[-1].endswith(f" is {result}."), (op, trace)
        written = [int(line.split("write ")[1][0]) for line in lines if "write " in line]
        assert written[::-1] == [int(d) for d in so_far[-1][-len(written):]], trace
