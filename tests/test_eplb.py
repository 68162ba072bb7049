"""EPLB: DeepSeek's published example exactly, placement invariants for both policies, the CLI."""

import json

import pytest
import torch

from sobre.cli import main
from sobre.eplb import gpu_loads, imbalance, naive_gpu_loads, rebalance_experts

EXAMPLE = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_deepseek_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(EXAMPLE, 16, 4, 2, 8)  # 16 replicas, 4 groups, 2 nodes, 8 GPUs
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 5)


def check_placement(w, phy2log, log2phy, logcnt, replicas):
    L, n = w.shape
    for i in range(L):
        counts = torch.bincount(phy2log[i], minlength=n)
        assert counts.tolist() == logcnt[i].tolist() and int(counts.min()) >= 1  # every expert placed
        for e in range(n):  # log2phy lists exactly the slots holding e, -1 padded
            slots = sorted(s for s in log2phy[i, e].tolist() if s >= 0)
            assert slots == sorted((phy2log[i] == e).nonzero().flatten().tolist())
    assert int(logcnt.sum()) == L * replicas


@pytest.mark.parametrize("groups,nodes,gpus,replicas", [(4, 2, 8, 16), (3, 2, 4, 16), (1, 1, 4, 20), (6, 3, 6, 18)])
def test_placements_are_consistent_and_balance_load(groups, nodes, gpus, replicas):
    g = torch.Generator().manual_seed(groups * 7 + gpus)
    w = (torch.rand(3, 12, generator=g) ** 4 * 1000).round()  # skewed loads: a few hot experts
    phy2log, log2phy, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus)
    check_placement(w, phy2log, log2phy, logcnt, replicas)
    after = imbalance(gpu_loads(w, phy2log, logcnt, gpus))
    before = imbalance(naive_gpu_loads(w, gpus))
    assert (after <= before + 1e-6).all() and after.mean() < before.mean()
    if groups % nodes:  # global policy: the hottest expert of each layer got the most replicas
        assert (logcnt.gather(1, w.argmax(1, keepdim=True)).flatten() == logcnt.max(1).values).all()


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple"):
        rebalance_experts(EXAMPLE, 15, 4, 2, 8)
    with pytest.raises(ValueError, match="every expert needs a slot"):
        rebalance_experts(EXAMPLE, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="layers, experts"):
        rebalance_experts(EXAMPLE[0], 16, 4, 2, 8)


def test_cli_reads_a_run_folder(tmp_path, capsys):
    rows = [{"step": s, "expert_load": EXAMPLE.tolist()} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["eplb", str(tmp_path), "--gpus", "8", "--nodes", "2", "--groups", "4", "--replicas", "16"])
    out = capsys.readouterr().out
    assert "hierarchical" in out and "experts per GPU: 5 6 | 5 7 | 8 4" in out  # doubled loads, same plan
    (tmp_path / "m.json").write_text(json.dumps(EXAMPLE.tolist()))
    main(["eplb", str(tmp_path / "m.json"), "--gpus", "4"])
    assert "global" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such run folder"):
        main(["eplb", str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(["eplb", str(tmp_path / "empty")])
