"""torchrun with 2 gloo processes: expert-parallel MoE == single-process MoE; FSDP2 (and FSDP2 + EP) training
gives the losses of one process on the same global batch; post-training (sft, distill, grpo) runs data parallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def check(cmd, timeout, env=ENV):
    """subprocess.run that fails with the child's stderr in the message."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    why = [x for x in r.stderr.splitlines() if any(w in x for w in ("Error", "error:", "terminate", "Exception"))]
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stderr[-6000:]}\n" + "\n".join(why[:40])


def test_expert_parallel_moe_equals_single_process(tmp_path):
    out = tmp_path / "ep.json"
    check(TORCHRUN + [str(Path(__file__).parent / "dist" / "ep_moe.py"), str(out)], timeout=120)
    diff = json.loads(out.read_text())
    assert all(v < 1e-5 for v in diff.values()), diff


def test_expert_parallel_engine_equals_single_process(tmp_path):
    """The engine with experts sharded over 2 ranks, hot experts copied by EPLB: same logits, greedy and
    seeded-sampled tokens as one process; every copy of a hot expert gets tokens."""
    out = tmp_path / "ep.json"
    check(TORCHRUN + [str(Path(__file__).parent / "dist" / "ep_generate.py"), str(out)], timeout=180)
    r = json.loads(out.read_text())
    assert r["logits_diff"] < 1e-5 and r["greedy_equal"] and r["sampled_equal"], r
    assert r["slots_per_rank"] == [4, 4, 4] and r["hot_copies"] == [2, 2, 2] and all(r["copies_used"]), r


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v4"])
def test_generate_cli_expert_parallel(tmp_path, arch):
    """`torchrun ... sobre generate --expert-parallel --redundant-experts 2` prints what one process prints
    (V3's experts and V4's fused, clipped ones alike)."""
    import sobre

    from conftest import random_model
    path = tmp_path / "m"
    if arch == "deepseek_v4":
        sobre.save(sobre.init_weights(sobre.model.build_model(sobre.preset("debug", arch=arch)), std=0.1), path)
    else:
        sobre.save(random_model(sobre.preset("debug", n_mtp_layers=0)), path)
    args = ["-m", "sobre", "generate", str(path), "--ids", "5,9,12,40,7", "--max-new-tokens", "10"]
    one = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=ENV, timeout=120)
    two = subprocess.run(TORCHRUN + ["--no-python", sys.executable] + args
                         + ["--expert-parallel", "--redundant-experts", "2"],
                         capture_output=True, text=True, env=ENV, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert len(one.stdout.split()) == 10 and two.stdout == one.stdout
    assert "EPLB replicated experts" in two.stderr
    alone = subprocess.run([sys.executable] + args + ["--expert-parallel"], capture_output=True, text=True, env=ENV,
                           timeout=120)  # outside torchrun: a one-line error, no traceback
    assert alone.returncode != 0 and "torchrun" in alone.stderr and "Traceback" not in alone.stderr


def train(tmp_path, name, *extra, procs=1, data_from=None):
    run = tmp_path / name
    if data_from:  # share the tokenizer and tokenised data: only the parallelism differs
        run.mkdir()
        for d in ("tokenizer", "data"):
            shutil.copytree(data_from / d, run / d)
    args = ["-m", "sobre", "pretrain", "--preset", "debug", "--out", str(run), "--steps", "6", "--save-every", "3",
            "--batch-size", "8", "--seq-len", "64", "--eval-every", "3", "--data-bytes", "300000", *extra]
    cmd = TORCHRUN + ["--no-python", sys.executable] + args if procs > 1 else [sys.executable] + args
    check(cmd, timeout=600)
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [(), ("--expert-parallel",)], ids=["fsdp", "fsdp+ep"])
def test_two_processes_match_one(tmp_path, extra):
    one_run, one = train(tmp_path, "one")
    two_run, two = train(tmp_path, "two", *extra, procs=2, data_from=one_run)
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a["step"], a[key], b[key])
        assert a["expert_load_max_over_mean"] == pytest.approx(b["expert_load_max_over_mean"], rel=1e-6)
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) < 1e-4
    # the checkpoint of the 2-process run resumes in one process (same file layout for any world size)
    check([sys.executable, "-m", "sobre", "pretrain", "--preset", "debug", "--out", str(two_run), "--steps", "7",
           "--save-every", "3", "--batch-size", "8", "--seq-len", "64", "--resume"], timeout=300)
    assert json.loads((two_run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 7


def test_v4_fsdp_ep_and_activation_checkpointing_match_one_process(tmp_path):
    """DeepSeek-V4 (CSA/HCA, mHC, hash MoE) under FSDP2 on 2 processes, FSDP2 + expert parallel, and with
    activation checkpointing in one: the same losses, indexer KL, grad norms and expert loads as one process."""
    v4 = ("--arch", "deepseek_v4")
    one_run, one = train(tmp_path, "one", *v4)
    _, two = train(tmp_path, "two", *v4, procs=2, data_from=one_run)
    _, ep = train(tmp_path, "ep", *v4, "--expert-parallel", procs=2, data_from=one_run)
    _, ckpt = train(tmp_path, "ckpt", *v4, "--activation-checkpointing", data_from=one_run)
    for other in (two, ep, ckpt):
        assert [r["step"] for r in other] == list(range(1, 7))
        for a, b in zip(one, other):
            for key in ("loss", "indexer_kl", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a["step"], a[key], b[key])
            assert a["expert_load"] == b["expert_load"]
    check([sys.executable, "-m", "sobre", "pretrain", "--preset", "debug", "--arch", "deepseek_v4", "--out",
           str(tmp_path / "ep"), "--steps", "7", "--save-every", "3", "--batch-size", "8", "--seq-len", "64",
           "--resume"], timeout=300)  # the 2-process, expert-parallel checkpoints resume in one process


def test_grpo_update_over_two_ranks_equals_one_process(tmp_path):
    """GRPO's update with each rank's share of the groups (data parallel: the whole batch's normalisers, summed
    gradients), on whole replicas and on FSDP2-sharded blocks, takes one process's step over every group: grpo,
    DAPO with the batch's reward std, Dr. GRPO over two epochs, router biases updated, a rank whose completions all
    leave the loss (overlong filter) or carry no signal, no signal anywhere (the batch's one shortest completion
    kept, as one process keeps it), ranks of different micro-batch counts, the KL to a reference over two epochs,
    the top 40% of the tokens by entropy (the threshold over every rank's tokens), an entropy bonus over the kept
    half (its mean over every rank's kept tokens; rank 1's completions carry no advantage, and train for it), the
    rollouts' kept routing and sampling floors (DeepSeek-V3.2's Keep Routing and Keep Sampling Mask), two
    mini-batches a step over two epochs (--steps-per-generation: each rank's k-th group in the k-th step), and a
    DeepSeek-V4 model's kept routing and balancing bias over two epochs. Under FSDP the router biases move by loads
    that count each completion's prompt (its own padded row)."""
    out = tmp_path / "grpo.json"
    check(TORCHRUN + [str(Path(__file__).parent / "dist" / "grpo_update.py"), str(out)], timeout=240)
    r = json.loads(out.read_text())
    assert len(r) == 28
    for name, v in r.items():
        assert v["state"] < 1e-5, (name, v["state"])
        # (FSDP's update runs each completion's prompt in its own row: the router biases' loads count it each time)
        assert v["bias"] < 1e-5 or name in ("router_bias fsdp", "v4_routing_bias fsdp"), (name, v["bias"])
        assert (v["moved"] > 0.01) == (not name.startswith("no_signal_anywhere")), (name, v["moved"])
        for k, (two, one) in v["stats"].items():
            assert two == pytest.approx(one, rel=1e-5, abs=1e-6), (name, k, two, one)
    assert r["router_bias"]["bias_moved"] > 0.005 and r["grpo"]["bias_moved"] == 0
    assert r["v4_routing_bias"]["bias_moved"] > 0.005 and r["v4_routing_bias fsdp"]["bias_moved"] > 0.005
    assert r["router_bias fsdp"]["bias_moved"] > 0.005 and r["beta_mu2 fsdp"]["stats"]["kl"][1] > 0
    assert 0.3 < r["entropy_top40"]["stats"]["entropy_kept"][1] < 0.5  # (one process's share: the top 40%)
    assert r["entropy_bonus"]["stats"]["signal"][1] == pytest.approx(0.5)


def test_rejection_sampling_over_two_ranks_writes_what_one_process_writes(tmp_path):
    """Each rank samples every other problem; rank 0 writes their kept completions in the problems' order: the
    file and the counts of one process (completions faked, so that both sides see the same ones). The held-out
    evaluation split so (GRPO's under torchrun) gives every rank one process's figures."""
    check(TORCHRUN + [str(Path(__file__).parent / "dist" / "rejection.py"), str(tmp_path)], timeout=120)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["world"] == 2 and r["one"]["kept"] > 0 and r["one"]["solved"] < r["one"]["problems"] == 5
    assert {k: v for k, v in r["two"].items() if k != "file"} == {k: v for k, v in r["one"].items() if k != "file"}
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    for rank in (0, 1):
        ev = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert ev["two"] == ev["one"] and ev["one"]["problems"] == 5 and len(set(ev["one"]["solved"])) > 1
        assert 0 < ev["one"]["pass@1"] < 1 and 0 < ev["one"]["format"] < 1


def post_train(verb, run, *args, procs=1, timeout=300, env=ENV):
    cmd = ["-m", "sobre", verb, "--out", str(run), *args]
    check(TORCHRUN[:-1] + [str(procs), "--no-python", sys.executable] + cmd if procs > 1 else [sys.executable] + cmd,
          timeout, env)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def close(a, b, keys):
    """Metrics lines a and b log the same steps and, within 1e-4, the same keys' values (where a step has them)."""
    for x, y in zip(a, b, strict=True):
        for k in keys:
            assert (k in x) == (k in y), (k, x, y)
            assert k not in x or x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x, y)


def test_post_training_under_torchrun(tmp_path):
    """sft and distill in 2 processes (data parallel; sft also with its blocks sharded, --fsdp) log the losses,
    grad norms and validation losses of one process on the same batches, and export the same weights; their
    checkpoints resume in one process. grpo in 2 processes: one metrics line a step for every rank's groups, the
    evaluations and completions rank 0 writes, resumable in one process; with --fsdp (and resumed so) the same
    figures and weights, the KL's reference moving toward the policy every step (--ref-sync-steps: its shards
    mixed, its whole weights checkpointed). eval in 2 processes prints one process's figures. A count the
    processes do not divide, and a verb that runs in one process, are clear errors."""
    import sobre
    sft = ["--preset", "debug", "--task", "countdown", "--examples", "64", "--steps", "4", "--batch-size", "8",
           "--seq-len", "128", "--eval-every", "2", "--save-every", "2"]
    one = post_train("sft", tmp_path / "one", *sft)
    (tmp_path / "two").mkdir()
    shutil.copytree(tmp_path / "one" / "tokenizer", tmp_path / "two" / "tokenizer")  # only the processes differ
    two = post_train("sft", tmp_path / "two", *sft, procs=2)
    close(one, two, ("step", "loss", "grad_norm", "target_tokens", "val_loss"))
    (tmp_path / "fsdp").mkdir()
    shutil.copytree(tmp_path / "one" / "tokenizer", tmp_path / "fsdp" / "tokenizer")
    close(one, post_train("sft", tmp_path / "fsdp", *sft, "--fsdp", procs=2),  # the blocks sharded (FSDP2)
          ("step", "loss", "grad_norm", "target_tokens", "val_loss"))
    a = sobre.load(tmp_path / "one" / "model").state_dict()
    for other in ("two", "fsdp"):
        b = sobre.load(tmp_path / other / "model").state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, other
    assert post_train("sft", tmp_path / "fsdp", *sft[:7], "5", *sft[8:], "--resume")[-1]["step"] == 5
    from sobre import sft as sft_module
    with pytest.raises(ValueError, match="--fsdp shards the blocks over torchrun's processes"):
        sft_module.sft(sft_module.SFTArgs(out=str(tmp_path / "alone"), task=("countdown",), fsdp=True))

    distill = ["--teacher", str(tmp_path / "one"), "--task", "countdown", "--examples", "16", "--samples", "1",
               "--max-new-tokens", "8", "--with-reference", "--preset", "debug", "--steps", "3", "--batch-size", "4",
               "--seq-len", "128", "--eval-every", "3"]
    close(post_train("distill", tmp_path / "d1", *distill), post_train("distill", tmp_path / "d2", *distill, procs=2),
          ("step", "loss", "grad_norm", "val_loss"))

    grpo = ["--init", str(tmp_path / "one"), "--task", "countdown", "--steps", "2", "--prompts", "4", "--group", "4",
            "--max-new-tokens", "12", "--eval-every", "2", "--eval-problems", "4", "--log-completions", "100",
            "--beta", "0.05", "--ref-sync-steps", "1",  # (the KL's reference moves: sharded alike, checkpointed)
            "--entropy-coef", "0.01"]  # (step 1's completions carry no advantage: the bonus alone moves the policy)
    rows = post_train("grpo", tmp_path / "g", *grpo, procs=2)
    assert [r["step"] for r in rows] == [1, 2] and all(r["groups_kept"] == 4 == r["groups_drawn"] for r in rows)
    assert len((tmp_path / "g" / "completions.jsonl").read_text().splitlines()) == 2 * 16
    assert [json.loads(line)["step"] for line in (tmp_path / "g" / "eval.jsonl").read_text().splitlines()] == [0, 2]
    assert json.loads((tmp_path / "g" / "config.json").read_text())["world"] == 2
    # --fsdp (the update on sharded blocks, the rollouts on a whole copy): one step, then resumed for the second,
    # logs the replicas' figures and exports their weights
    post_train("grpo", tmp_path / "gf", *grpo[:5], "1", *grpo[6:], "--fsdp", procs=2)
    sharded = post_train("grpo", tmp_path / "gf", *grpo, "--fsdp", "--resume", procs=2)
    close(rows, sharded, ("step", "reward_mean", "accuracy", "completion_length", "loss", "grad_norm", "entropy",
                          "signal", "kl"))
    assert rows[1]["kl"] > 0
    a, b = (sobre.load(tmp_path / run / "model").state_dict() for run in ("g", "gf"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert post_train("grpo", tmp_path / "g", *grpo[:5], "3", *grpo[6:], "--resume")[-1]["step"] == 3

    odd = subprocess.run(TORCHRUN + ["--no-python", sys.executable, "-m", "sobre", "grpo", "--out",
                                     str(tmp_path / "odd"), "--prompts", "3"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert odd.returncode != 0 and "--prompts 3 does not split over 2 processes" in odd.stderr
    # sobre eval in 2 processes (each its share of the problems and of the reference solutions' loss): one process's
    # figures, printed once
    ev = ["-m", "sobre", "eval", str(tmp_path / "one"), "--task", "countdown", "arithmetic", "--problems", "6",
          "--max-new-tokens", "12", "--json"]
    printed = [subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
               for cmd in ([sys.executable] + ev, TORCHRUN + ["--no-python", sys.executable] + ev)]
    assert all(r.returncode == 0 for r in printed), printed[1].stderr[-3000:]
    one, two = ([json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")] for r in printed)
    assert len(one) == len(two) == 2 and all(x["problems"] == 6 for x in two)
    for x, y in zip(one, two):
        assert x.pop("val_loss") == pytest.approx(y.pop("val_loss"), rel=1e-5) and x.pop("val_bpb") == pytest.approx(
            y.pop("val_bpb"), rel=1e-5)
        assert x == y
    alone = subprocess.run([sys.executable, "-m", "sobre", "verify", str(tmp_path / "one" / "model")],
                           capture_output=True, text=True, env={**ENV, "WORLD_SIZE": "2"}, timeout=120)
    assert alone.returncode != 0 and "sobre verify: error: runs in one process, not under torchrun" in alone.stderr


def test_lora_on_sharded_blocks_under_torchrun(tmp_path):
    """--lora-rank with --fsdp: the frozen blocks and their adapters sharded over 2 processes. sft logs one
    process's losses and grad norms and writes its adapter, resumes in one process; grpo (the KL's reference the
    model with its adapters off) one step, then resumed for the second, logs the replicas' figures and writes
    their adapter. --fsdp with --int8 (buffers FSDP does not shard) is a clear error."""
    from safetensors.torch import load_file

    import sobre
    from sobre.data import builtin_docs
    from sobre.lora import TuneArgs
    from sobre.tokenizer import train_tokenizer

    from conftest import random_model
    tok = train_tokenizer(builtin_docs(300_000), 512, tmp_path / "tok")
    cfg = sobre.preset("debug", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    init = sobre.save(random_model(cfg, std=0.05), tmp_path / "init", tokenizer_dir=tmp_path / "tok")

    def adapter_diff(x, y):
        a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in (x, y))
        assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # (they trained)
        return max((a[k] - b[k]).abs().max().item() for k in a)

    sft = ["--init", str(init), "--task", "arithmetic", "--examples", "64", "--steps", "4", "--batch-size", "8",
           "--seq-len", "128", "--eval-every", "2", "--save-every", "2", "--lora-rank", "4", "--lr", "1e-2"]
    one, two = post_train("sft", tmp_path / "one", *sft), post_train("sft", tmp_path / "two", *sft, "--fsdp", procs=2)
    close(one, two, ("step", "loss", "grad_norm", "target_tokens", "val_loss"))
    assert adapter_diff("one", "two") < 1e-5
    resumed = post_train("sft", tmp_path / "two", *sft[:7], "5", *sft[8:], "--resume")  # in one process
    assert resumed[-1]["step"] == 5 and resumed[:4] == two

    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    grpo = ["--init", str(init), "--task", "arithmetic", "--reward", "test_grpo:spread_reward", "--steps", "2",
            "--prompts", "4", "--group", "4", "--max-new-tokens", "12", "--eval-every", "2", "--eval-problems", "4",
            "--lora-rank", "4", "--beta", "0.05", "--lr", "1e-3"]
    rows = post_train("grpo", tmp_path / "g", *grpo, procs=2, env=env)
    post_train("grpo", tmp_path / "gf", *grpo[:7], "1", *grpo[8:], "--fsdp", procs=2, env=env)
    sharded = post_train("grpo", tmp_path / "gf", *grpo, "--fsdp", "--resume", procs=2, env=env)
    close(rows, sharded, ("step", "reward_mean", "loss", "grad_norm", "kl", "entropy", "signal"))
    assert rows[-1]["kl"] > 0 and adapter_diff("g", "gf") < 1e-5
    with pytest.raises(ValueError, match="--fsdp with --int8"):
        TuneArgs(lora_rank=4, int8=True, fsdp=True).check_fsdp(2)


KEEP_FREED = """
import ctypes, json, os, torch
from sobre.parallel import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def mapped():  # bytes a fresh 64 MB tensor adds to malloc's mmapped regions
    before = libc.mallinfo2().hblkhd
    x = torch.empty(1 << 24)
    return libc.mallinfo2().hblkhd - before

os.environ["SOBRE_KEEP_FREED_MEMORY"] = "0"
out = {"off": keep_freed_memory.__wrapped__(), "off_mapped": mapped()}
del os.environ["SOBRE_KEEP_FREED_MEMORY"]
out.update(on=keep_freed_memory.__wrapped__(), on_mapped=mapped())
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_large_buffers_from_the_heap():
    """glibc maps a 64 MB buffer fresh from the kernel (page faults on every first touch) unless sobre told its
    malloc to keep freed memory; SOBRE_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["off"] is False and out["off_mapped"] >= 1 << 26, out
    assert out["on"] is True and out["on_mapped"] == 0, out


def test_gpu_ranks_take_nccl_and_gloo_for_host_tensors(monkeypatch):
    """Under torchrun on GPUs each rank takes its LOCAL_RANK's GPU, and the process group carries gloo beside
    NCCL: the trainers all-reduce small host tensors (losses, the grad norm's squares, eval loss, a seed), which
    NCCL alone refuses."""
    import torch
    import torch.distributed as dist

    from sobre import parallel
    got = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(parallel, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: got.setdefault("gpu", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: got.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert parallel.init("cuda") == (1, 2, torch.device("cuda", 1))
    assert got == {"gpu": torch.device("cuda", 1), "backend": "cpu:gloo,cuda:nccl"}


def test_release_whole_frees_what_copy_whole_refills():
    """GRPO --fsdp's whole copy of the weights (the rollouts') is freed through the update: release_whole frees
    the memory of the parameters that train (a frozen MTP module's stays), copy_whole gives it back, filled with
    the trained weights; the copy then samples as the model does."""
    import copy

    import torch

    from sobre.engine import generate
    from sobre.parallel import copy_whole, release_whole

    from conftest import random_model
    model = random_model()
    model.mtp.requires_grad_(False)
    policy = copy.deepcopy(model).eval()
    release_whole(policy, model)
    for (name, p), q in zip(policy.named_parameters(), model.parameters()):
        assert (p.untyped_storage().nbytes() == 0) == q.requires_grad, name
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # (an update)
    copy_whole(policy, model)
    for (name, p), q in zip(policy.named_parameters(), model.parameters()):
        assert torch.equal(p, q) if q.requires_grad else not torch.equal(p, q), name
    prompt = [1, 5, 9, 2]
    assert list(generate(policy, prompt, 8)) == list(generate(model.eval(), prompt, 8))


def test_sft_indexer_kl_over_two_ranks_equals_one_process(tmp_path):
    """sft --indexer-kl on a DSA model in 2 processes with its blocks sharded (--fsdp): one process's losses,
    indexer KLs and grad norms (each rank's mean KL is 1 / world of the batch's: the ranks' rows are equal
    shares)."""
    import sobre
    from sobre.data import builtin_docs
    from sobre.tokenizer import train_tokenizer

    from conftest import SPARSE_MODELS, random_model
    tok = train_tokenizer(builtin_docs(200_000), 512, tmp_path / "tok")
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, **SPARSE_MODELS["dsa"]))
    sobre.save(model, tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    sft = ["--init", str(tmp_path / "m"), "--task", "arithmetic", "--examples", "40", "--steps", "3",
           "--batch-size", "4", "--seq-len", "160", "--indexer-kl", "1", "--eval-every", "100"]
    one = post_train("sft", tmp_path / "one", *sft)
    assert all(r["indexer_kl"] > 0 for r in one)
    close(one, post_train("sft", tmp_path / "two", *sft, "--fsdp", procs=2),
          ("step", "loss", "indexer_kl", "grad_norm", "target_tokens"))
