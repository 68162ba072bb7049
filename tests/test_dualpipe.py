"""Pipeline schedules: every micro-batch is forwarded and backwarded once per stage, dependencies hold in the
simulated timeline (checked here independently of the simulator), the bubbles / memory reproduce the
comparison table of DeepSeek's DualPipe README, and executed over gloo the schedules give one process's
gradients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sobre.dualpipe import Times, dualpipe, one_f_one_b, simulate, table

CASES = [(4, 8), (4, 10), (6, 12), (8, 16), (8, 20)]


def check_timeline(res, P, directions):
    """Independent replay: F after the previous stage's F; B/I after this stage's F and the next stage's
    B/I; W after this stage's I; one op at a time per rank; each F, backward and W exactly once."""
    when = {}
    for r, row in enumerate(res.timeline):
        last_end = 0.0
        for start, end, op in row:
            assert start >= last_end - 1e-9 and end > start
            last_end = end
            for kind, d, mb in op:
                stage = r if d == 0 else P - 1 - r
                key = ("B" if kind in "BI" else kind, d, mb, stage)
                assert key not in when, f"{key} runs twice"
                when[key] = (start, end, kind)
    M = sum(1 for k in when if k[0] == "F") // P
    for (kind, d, mb, s), (start, _, sub) in when.items():
        if kind == "F" and s > 0:
            assert start >= when["F", d, mb, s - 1][1]
        if kind == "B":
            assert start >= when["F", d, mb, s][1]
            if s < P - 1:
                assert start >= when["B", d, mb, s + 1][1]
            assert (sub == "I") == (("W", d, mb, s) in when)
        if kind == "W":
            assert start >= when["B", d, mb, s][1]
    per_direction = M // len(directions)
    for d in directions:
        for mb in range(per_direction):
            for s in range(P):
                assert ("F", d, mb, s) in when and ("B", d, mb, s) in when


@pytest.mark.parametrize("P,M", CASES)
def test_schedules_are_valid(P, M):
    for times in (Times(), Times(1, 2, 0.5, 2.5), Times(1.3, 2.9, 1.1, 3.1)):
        check_timeline(simulate(one_f_one_b(P, M), times), P, (0,))
        check_timeline(simulate(one_f_one_b(P, M, zero_bubble=True), times), P, (0,))
        check_timeline(simulate(dualpipe(P, M), times, dualpipe=True), P, (0, 1))


@pytest.mark.parametrize("P,M", CASES)
@pytest.mark.parametrize("times", [Times(), Times(1, 2, 1, 2), Times(1, 1, 0, 2), Times(2, 3, 1, 4)])
def test_bubbles_and_memory_match_the_dualpipe_readme(P, M, times):
    rows = {r["method"]: r for r in table(P, M, times)}
    for name in ("1F1B", "ZB1P", "DualPipe"):
        assert rows[name]["bubble"] == pytest.approx(rows[name]["bubble_formula"]), rows[name]
    assert [rows[n]["activation"] for n in ("1F1B", "ZB1P", "DualPipe")] == [P, P, P + 1]
    assert [rows[n]["params"] for n in ("1F1B", "ZB1P", "DualPipe")] == [1, 1, 2]
    assert rows["DualPipe"]["bubble"] <= rows["ZB1P"]["bubble"] <= rows["1F1B"]["bubble"]


def test_dualpipe_rank_work_is_balanced():
    P, M = 8, 20
    for ops in dualpipe(P, M):
        parts = [p for op in ops for p in op]
        assert sum(p[0] == "F" for p in parts) == M
        assert sum(p[0] in "BI" for p in parts) == M
        assert sum(p[0] == "W" for p in parts) == sum(p[0] == "I" for p in parts)


def test_broken_schedules_raise():
    sched = one_f_one_b(4, 8)
    sched[1] = sched[1][1:] + sched[1][:1]  # rank 1 starts with a backward it cannot run yet
    with pytest.raises(ValueError, match="deadlock"):
        simulate(sched, Times())
    sched = one_f_one_b(4, 8)
    sched[2].append(sched[2][-1])
    with pytest.raises(ValueError, match="twice"):
        simulate(sched, Times())
    sched = one_f_one_b(4, 8)
    sched[0] = [op for op in sched[0] if op[0][:2] != ("B", 0) or op[0][2] != 5]
    with pytest.raises(ValueError, match="micro-batch 5"):
        simulate(sched, Times())
    for P, M in ((3, 12), (4, 6), (4, 9)):
        with pytest.raises(ValueError, match="DualPipe needs"):
            dualpipe(P, M)


def test_schedules_execute_over_gloo_with_single_process_gradients(tmp_path):
    """4 torchrun processes run 1F1B, ZB1P (I and W split) and DualPipe (two chunk copies, gradients
    synced) on a tiny MLP over gloo point-to-point: every chunk's gradient and the loss equal one process's."""
    out = tmp_path / "dp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           str(Path(__file__).parent / "dist" / "dualpipe_run.py"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    for name, v in json.loads(out.read_text()).items():
        assert v["grad_diff"] < 1e-4 and abs(v["loss"] - v["ref_loss"]) < 1e-5 * v["ref_loss"], (name, v)


def test_cli_prints_the_table_and_plots(tmp_path, capsys):
    from sobre.cli import main
    main(["dualpipe", "--ranks", "4", "--micro-batches", "8", "--plot", str(tmp_path / "dp.png")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert rows["1F1B"][:2] == ["9.00", "9.00"] and rows["ZB1P"][:2] == ["3.00", "3.00"]
    assert rows["DualPipe"][:4] == ["2.00", "2.00", "2x", "5"]
    assert (tmp_path / "dp.png").stat().st_size > 10_000
