"""Run under torchrun (2 ranks): rejection sampling with each rank sampling every other problem writes, in the
problems' order, what one process writes (the completions faked: every other one right, one of them twice)."""

import json
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

from sobre import rollout
from sobre.parallel import init
from sobre.rollout import Rollout
from sobre.tasks import get_task

tok = SimpleNamespace(eos_token=None)
task = get_task("arithmetic")


def fake(model, tok, task, problems, n, *args, **kw):
    """Completions 0 and 2 right and the same, 1 and 3 wrong; a third of the problems (by their text) all wrong."""
    def answer(p, j):
        return p.answer if j % 2 == 0 and zlib.crc32(p.prompt.encode()) % 3 else "no"
    texts = [[f"work\n</think>\n\nAnswer: {answer(p, j)}" for j in range(n)] for p in problems]
    return [[Rollout([1], [2], t, False, task.correct(t, p.answer), 1.0, None) for t in ts]
            for p, ts in zip(problems, texts)]


rollout.rollouts = fake
out = Path(sys.argv[1])
one = rollout.rejection_sample(None, tok, task, 5, 4, out / "one.jsonl", per_problem=2)  # one process
rank, world, _ = init()
two = rollout.rejection_sample(None, tok, task, 5, 4, out / "two.jsonl", per_problem=2)
if rank == 0:
    (out / "result.json").write_text(json.dumps({"one": one, "two": two, "world": world}))
