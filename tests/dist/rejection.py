"""Run under torchrun (2 ranks): rejection sampling with each rank sampling every other problem writes, in the
problems' order, what one process writes (the completions faked: every other one right, one of them twice); the
held-out evaluation split over the ranks gives one process's figures."""

import json
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

from sobre import rollout
from sobre.parallel import finish, init
from sobre.rollout import Rollout
from sobre.tasks import get_task

tok = SimpleNamespace(eos_token=None)
task = get_task("arithmetic")


def fake(model, tok, task, problems, n, *args, **kw):
    """Completions 0 and 2 right and the same, 1 and 3 wrong; a third of the problems (by their text) all wrong."""
    def answer(p, j):
        return p.answer if j % 2 == 0 and zlib.crc32(p.prompt.encode()) % 3 else "no"
    texts = [[f"work\n</think>\n\nAnswer: {answer(p, j)}" for j in range(n)] for p in problems]
    return [[Rollout([1], [2] * (1 + zlib.crc32(p.prompt.encode()) % 5), t, False, task.correct(t, p.answer),
                     float(j < 3), None) for j, t in enumerate(ts)] for p, ts in zip(problems, texts)]


rollout.rollouts = fake
out = Path(sys.argv[1])
one = rollout.rejection_sample(None, tok, task, 5, 4, out / "one.jsonl", per_problem=2)  # one process
eval_one = rollout.evaluate_task(None, tok, task, 5, 4)
rank, world, _ = init()
two = rollout.rejection_sample(None, tok, task, 5, 4, out / "two.jsonl", per_problem=2)
eval_two = rollout.evaluate_task(None, tok, task, 5, 4, ranks=True)  # (rank 0: problems 0, 2, 4; rank 1: 1, 3)
(out / f"eval{rank}.json").write_text(json.dumps({"one": eval_one, "two": eval_two}))
if rank == 0:
    (out / "result.json").write_text(json.dumps({"one": one, "two": two, "world": world}))
finish()  # (a process that leaves with its process group alive may abort in gloo's threads)
