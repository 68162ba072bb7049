"""`sobre speedrun`: the whole DeepSeek pipeline on built-in defaults, ending in a report card.

Stages, each in its own folder of the run: a finished stage is skipped, an interrupted one resumes from its
last checkpoint, `--force` redoes them all:
  pretrain   BPE tokenizer + DeepSeek-V3-style model (MLA, MoE with aux-loss-free balancing, MTP) on the
             built-in offline corpus; HF export; transformers gives the same logits and greedy tokens;
             engine speed plain vs MTP speculative decoding (acceptance of the trained MTP head)
  sft        cold start on task traces in R1's format (<think> reasoning </think> answer); a DIRECT share of
             them answers at once with an empty <think> block (DeepSeek's non-thinking mode)
  grpo       GRPO with the correctness reward alone on the engine's rollouts: the policy learns when thinking
             pays off (the report shows the share of completions that think, before and after)
  distill    the GRPO model's verified traces and the task's own traces, with the GRPO model's top-k logits
             -> a dense Qwen2-style student; and the same student trained on the task's own traces alone
             (no teacher), for comparison, where the budget allows
  eval       held-out pass@1 of every stage's model
-> report.md (+ the stages' PNG plots). The run's size: RECIPE where this machine runs it within --minutes,
else cut where the result loses least (CUTS, then in proportion), replanned before every stage.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .checkpoint import load
from .config import Config, at_least_one, preset
from .distill import DistillArgs, distill
from .engine import Engine
from .grpo import GRPOArgs, grpo
from .linear import native_bf16
from .model import Transformer, init_weights
from .parallel import pick_device
from .report import expert_loads, plot_expert_heatmap, read_metrics
from .rollout import evaluate_task, sign_test
from .sft import SFTArgs, sft, start_model
from .stats import model_stats
from .tasks import get_task
from .tokenizer import load_tokenizer
from .train import TrainArgs, losses, pretrain

QUESTION = "Question: What is 12 + 7?\n<think>\n"
TASK = "arithmetic:1"  # two-digit + and -: within reach of a tiny model in minutes
DIRECT = 0.5  # share of the cold-start traces without worked steps; the rest work the columns out in <think>
EVAL_TASKS = (TASK, "arithmetic:2", "sorting:1")  # the trained task, a harder level of it, one it never saw
# held-out pass@1 as DeepSeek-R1 reports it, beside greedy: the mean correctness of this many samples a problem at
# temperature 0.6, top-p 0.95 (on TASK; GRPO's held-out curve too). Greedy decoding hides most of what GRPO
# changes in a model this small: it sharpens the sampled distribution toward the correct, worked answers
EVAL_SAMPLES = 8
BATCH, SEQ = 8, 256  # the pretraining batch

# ---- the run's size ------------------------------------------------------------------------------
# The plan: steps per part of the run. RECIPE is the default run (runs/speedrun16; the students at 450 steps since
# runs/speedrun22b); a machine that cannot run it within the budget saves first where the end result loses
# least, in this order, down to these steps:
# pretraining length matters little to it, GRPO's held-out gain is mostly in by step 20, the no-teacher
# student is only a comparison; SFT and the distilled student need all their tokens (README, "On a slower
# machine"). Only then does every part shrink in proportion.
RECIPE = {"pretrain": 300, "sft": 450, "grpo": 40, "student": 450, "baseline": 450}
CUTS = {"pretrain": 100, "grpo": 20, "baseline": 0}
# each part's cost in pretraining steps (the unit: one pretraining step's seconds on this machine), per step and
# fixed (tokenizer and checks, evaluations, the teacher's traces): runs/speedrun18 (1.07 s a pretraining step);
# GRPO's step since the engine's rollouts got faster: 5.4 units in runs/sr34 (an AVX2 EPYC), ~5 on the AMX Xeon;
# R1's sampled pass@1 (EVAL_SAMPLES; decoded in fp32 whatever the training precision) in GRPO's held-out curve and
# the evaluation: on session 42's AVX-512 EPYC (bf16: 0.27 s a unit, fp32 0.50) the evaluation 21 -> 50 s, GRPO's
# five held-out points 40 s (nine greedy ones took 22); counted here at fp32 units, which overstates them in bf16
STEP_COST = {"pretrain": 1.0, "sft": 1.24, "grpo": 5.5, "student": 1.08, "baseline": 1.05}
FIXED_COST = {"pretrain": 22, "sft": 20, "grpo": 60, "student": 190, "baseline": 0, "eval": 110}
PARTS = {"pretrain": ("pretrain",), "sft": ("sft",), "grpo": ("grpo",), "distill": ("student", "baseline"),
         "eval": ()}
STAGES = tuple(PARTS)
MARGIN = 0.95  # plan for this share of the budget: a 2-core machine's speed varies ~10% from run to run
# --precision auto: every training stage autocasts its matmuls to bf16 (weights and AdamW state stay fp32) where a
# timed pretraining step runs this much faster so: GPUs, CPUs with AMX (the 2-core AMX machine: 1.3-1.4x the
# pretraining step, 1.8x the student's); CPUs that emulate bf16 (no AVX512-BF16) train in fp32, untimed
BF16_GAIN = 1.2
PRECISIONS = ("auto", "fp32", "bf16")


def scaled_plan(steps: int) -> dict:
    """`--steps N`: N pretraining steps; SFT and the students 1.5x, GRPO 2/15 (N = 300: RECIPE)."""
    return {"pretrain": steps, "sft": steps * 3 // 2, "grpo": max(steps * 2 // 15, 2), "student": steps * 3 // 2,
            "baseline": steps * 3 // 2}


def cost(plan: dict) -> float:
    """Predicted wall time of the parts in `plan` plus the evaluation, in pretraining steps."""
    return FIXED_COST["eval"] + sum(FIXED_COST[k] + STEP_COST[k] * n for k, n in plan.items() if n)


def fit_plan(todo: dict, room: float) -> dict:
    """The parts still to run, `todo` ({part: steps}), cut to fit `room` pretraining steps: CUTS first, in
    order (the baseline goes whole: it compares only at the student's own size, and what its going frees is
    given back to GRPO, then pretraining), then all in proportion."""
    plan = dict(todo)
    for k, floor in CUTS.items():
        over = cost(plan) - room
        if over > 0 and plan.get(k):
            plan[k] = 0 if k == "baseline" else max(floor, min(plan[k], plan[k] - math.ceil(over / STEP_COST[k])))
    for k in reversed([k for k, floor in CUTS.items() if floor and k in plan]):
        plan[k] = min(todo[k], plan[k] + max(int((room - cost(plan)) / STEP_COST[k]), 0))
    over = cost(plan) - room
    if over > 0:
        f = max(1 - over / sum(STEP_COST[k] * n for k, n in plan.items()), 0.0)
        plan = {k: max(int(n * f), 1) if n else 0 for k, n in plan.items()}
    return plan


def pace(out: Path, plan: dict, done) -> float | None:
    """Seconds per pretraining step this machine has shown: the `done` stages' wall time over their cost."""
    if not done:
        return None
    return _spent(out, done) / (cost({k: plan[k] for s in done for k in PARTS[s]}) - FIXED_COST["eval"])


def _spent(out: Path, done) -> float:
    """Seconds the finished stages `done` took (their stage.json)."""
    return sum(json.loads((out / s / "stage.json").read_text())["minutes"] for s in done) * 60


def pretrain_step_seconds(preset_name: str, device: str = "cpu", bf16: bool = False, reps: int = 5) -> float:
    """Seconds of one pretraining step (forward with MTP, backward, AdamW; the median of `reps`) of a fresh
    preset model on the speedrun's pretraining batch (random tokens, one process's share) on `device`, its matmuls
    in bf16 autocast or fp32; leaves the global RNG alone."""
    cfg, times, dev = preset(preset_name), [], torch.device(device)
    with torch.random.fork_rng(devices=[]):
        model = init_weights(Transformer(cfg), seed=0).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1)).to(dev)
        for _ in range(reps + 2):  # the first two warm up
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = losses(model, x[:, :-1], x[:, 1:], TrainArgs())["total"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    return sorted(times[2:])[reps // 2]


def pick_precision(precision: str, preset_name: str, device: str) -> tuple[bool, dict]:
    """(bf16?, {"fp32": s, "bf16": s} the timed pretraining steps; {} unless `precision` is auto). A CPU without
    bf16 arithmetic of its own is not timed in bf16: it emulates it (an AVX2 EPYC: 22 s a step, fp32's 0.69 s, so
    timing it cost minutes) and trains in fp32."""
    if precision != "auto":
        return precision == "bf16", {}
    kinds = ("fp32", "bf16") if torch.device(device).type != "cpu" or native_bf16() else ("fp32",)
    timed = {p: pretrain_step_seconds(preset_name, device, bf16=p == "bf16") for p in kinds}
    return "bf16" in timed and timed["fp32"] >= BF16_GAIN * timed["bf16"], timed


def precision_note(timed: dict) -> str:
    if "bf16" not in timed:
        return f"a pretraining step took {timed['fp32']:.2f} s in fp32; this CPU has no native bf16"
    return f"a pretraining step took {timed['bf16']:.2f} s in bf16 autocast, {timed['fp32']:.2f} s in fp32 here"


def cuts(plan: dict) -> str:
    """What a budget-sized plan left out of RECIPE, for the report."""
    parts = [f"{k} {plan[k]} steps (default {RECIPE[k]})" for k in RECIPE if k != "baseline" and plan[k] != RECIPE[k]]
    if not plan["baseline"]:
        parts.append("no no-teacher student")
    return ", ".join(parts)


# ---- the run -------------------------------------------------------------------------------------
def speedrun(out: Path, preset_name: str = "tiny", seed: int = 0, steps: int | None = None, force: bool = False,
             eval_problems: int = 100, minutes: float = 30.0, device: str = "auto", nproc: int = 1,
             precision: str = "auto") -> dict:
    """`steps` sets the size of the run (see scaled_plan). None: the default RECIPE, cut where this machine could
    not run it in `minutes`: planned from a timed pretraining step, replanned before every stage from the pace
    the finished ones showed. A stage once started keeps its size (resume). Every stage runs on `device` (a
    --device value); the training stages run in `nproc` torchrun processes (each with its own GPU on cuda):
    pretraining FSDP2 with the global batch nproc x the one-process batch, SFT, GRPO and distillation data
    parallel on the one-process batch split over them; the evaluation in this one. `precision`:
    the training stages' matmuls in fp32 or bf16 autocast, or auto: bf16 where a timed step runs BF16_GAIN x
    faster (a resumed run keeps the precision it started with)."""
    dev = str(pick_device(device))
    at_least_one(**{"--nproc": nproc, "--eval-problems": eval_problems, "--steps": 1 if steps is None else steps})
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if nproc > 1 and dev.startswith("cuda") and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc}: one process per GPU, and this machine has {torch.cuda.device_count()}")
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "speedrun.json").read_text()) if (out / "speedrun.json").exists() and not force else {}
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if old:  # a resumed run keeps its precision (runs from before --precision trained in fp32)
        bf16, timed = old.get("bf16", False), old.get("step_seconds", {})
        was = "bf16" if bf16 else "fp32"
        if precision not in ("auto", was):
            raise ValueError(f"{out} was started in {was}: resume it with --precision auto or {was}, or "
                             f"--force to redo it in {precision}")
    else:
        bf16, timed = pick_precision(precision, preset_name, dev)
        if timed:
            print(f"speedrun: training in {'bf16 autocast' if bf16 else 'fp32'}: {precision_note(timed)}")
    results: dict = {"preset": preset_name, "seed": seed, "task": TASK, "direct": DIRECT, "device": dev,
                     "nproc": nproc,
                     "plan": scaled_plan(steps) if steps else old.get("plan", dict(RECIPE)),
                     "minutes_budget": None if steps else minutes, "bf16": bf16, "step_seconds": timed}
    start, plan = time.perf_counter(), results["plan"]

    def replan(first: str) -> None:
        """Size the stages from `first` on that have not started (a started one keeps its size); save the plan."""
        if steps is None:
            later, done = STAGES[STAGES.index(first):], STAGES[:STAGES.index(first)]
            fresh = {k: RECIPE[k] for s in later if force or not (out / s).exists() for k in PARTS[s]}
            started = {k: plan[k] for s in later for k in PARTS[s] if k not in fresh}
            sec = pace(out, plan, done) or timed.get("bf16" if bf16 else "fp32") or \
                pretrain_step_seconds(preset_name, dev, bf16)
            room = (MARGIN * minutes * 60 - _spent(out, done)) / sec - (cost(started) - FIXED_COST["eval"])
            plan.update(fit_plan(fresh, room))
            if first == "pretrain":
                print(f"speedrun: a pretraining step takes {sec:.2f} s here; the default run would take about "
                      f"{cost(RECIPE) * sec / 60:.0f} minutes" + (f"; to fit {minutes:g}: {cuts(plan)}" if cuts(plan)
                                                                  else ""))
        (out / "speedrun.json").write_text(json.dumps({k: v for k, v in results.items() if k not in STAGES}) + "\n")

    def stage(name: str, fn):
        done = out / name / "stage.json"
        if done.exists() and not force and current(name, json.loads(done.read_text())):
            results[name] = json.loads(done.read_text())
            print(f"speedrun: {name} already done ({done}); --force redoes it")
            return
        if name != "eval":
            replan(name)
        if force and (out / name).exists():
            shutil.rmtree(out / name)
        print(f"speedrun: stage {STAGES.index(name) + 1}/{len(STAGES)} {name}" + eta(name), flush=True)
        t0, cuda = time.perf_counter(), dev.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = fn(out / name)
        r["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        r["processes"] = 1 if name == "eval" else nproc
        r["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if cuda:  # this process's (a stage under torchrun runs in others)
            r["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        done.write_text(json.dumps(r, indent=2) + "\n")
        results[name] = r

    def current(name: str, r: dict) -> bool:  # a finished eval from an older sobre may lack today's measures
        return name != "eval" or all(t in r.get("pretrain", {}) for t in EVAL_TASKS) and "sampled" in r.get("sft", {})

    def eta(name: str) -> str:
        """Time left for this stage and the later ones, at the pace of the finished ones."""
        sec = pace(out, plan, STAGES[:STAGES.index(name)])
        if sec is None:
            return ""
        left = cost({k: plan[k] for s in STAGES[STAGES.index(name):] for k in PARTS[s]}) * sec
        return f" (elapsed {(time.perf_counter() - start) / 60:.1f} min, about {left / 60:.1f} min to go)"

    stage("pretrain", lambda d: _pretrain(d, preset_name, seed, plan["pretrain"], dev, nproc, bf16))
    stage("sft", lambda d: _finished(_train("sft", SFTArgs(
        out=str(d), init=str(out / "pretrain"), task=(TASK,), examples=min(5000, 12 * plan["sft"]), direct=DIRECT,
        steps=plan["sft"], batch_size=16, seq_len=256, lr=2e-3, warmup=20, eval_every=max(plan["sft"] // 3, 1),
        save_every=max(plan["sft"] // 3, 1), seed=seed, resume=True, device=dev, bf16=bf16), nproc), 16 * 256))
    stage("grpo", lambda d: _grpo_summary(_train("grpo", GRPOArgs(
        out=str(d), init=str(out / "sft"), task=TASK, steps=plan["grpo"], prompts=8, group=8,
        max_new_tokens=128, loss="dapo", lr=5e-5, warmup=max(plan["grpo"] // 4, 1),  # Adam's first steps hurt most
        min_lr_ratio=0.1,  # cosine decay: the policy switches to thinking early; later updates are mostly noise
        format_weight=0.0,  # the reward is correctness alone: whatever thinks more has to earn it
        eval_every=max(plan["grpo"] // 4, 1), eval_problems=eval_problems, eval_samples=EVAL_SAMPLES,
        save_every=max(plan["grpo"] // 3, 1), seed=seed, resume=True, device=dev, bf16=bf16), nproc), 8 * 8))
    stage("distill", lambda d: _distill(d, out, preset_name, plan["student"], plan["baseline"], seed, dev, bf16,
                                        nproc))
    stage("eval", lambda d: _evaluate(d, out, eval_problems, seed, dev))
    print(report(out))
    return results


def _finished(run: Path, tokens_per_step: int) -> dict:
    """A training stage's summary; FLOPs ~ 3 forward passes (forward + backward) over every token."""
    rows = read_metrics(run)
    tokens = rows[-1]["step"] * tokens_per_step
    return {"steps": rows[-1]["step"], "first_loss": rows[0].get("loss"), "final_loss": rows[-1].get("loss"),
            "folder": str(run), "tokens": tokens, "flops": 3 * _flops_per_token(run) * tokens}


def _flops_per_token(run: Path, ctx: int = 256) -> int:
    return model_stats(Config.load(Path(run) / "model"), ctx=ctx)["flops_per_token"]


def _grpo_summary(run: Path, samples_per_step: int) -> dict:
    """FLOPs ~ one forward per generated token (rollout) + three for the update."""
    rows = read_metrics(run)
    evals = read_metrics(run, "eval.jsonl")
    k = max(1, len(rows) // 5)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    cfg = json.loads((run / "config.json").read_text())["grpo"]
    # completions sampled a step: every drawn group's (runs before session 48 logged whole rounds of prompts)
    sampled = [r["groups_drawn"] * cfg["group"] if "groups_drawn" in r
               else samples_per_step * r.get("rollout_rounds", 1) for r in rows]
    tokens = round(sum(r["completion_length"] * n for r, n in zip(rows, sampled)))
    return {"tokens": tokens, "flops": 4 * _flops_per_token(run) * tokens, "steps": rows[-1]["step"],
            "folder": str(run), "heldout_pass@1": [(e["step"], e["pass@1"]) for e in evals],
            "heldout_samples": cfg.get("eval_samples", 1),
            "train_accuracy_first": mean("accuracy", rows[:k]), "train_accuracy_last": mean("accuracy", rows[-k:]),
            "thinking_first": mean("format", rows[:k]),  # completions with worked steps
            "thinking_last": mean("format", rows[-k:]), "samples_per_s": mean("samples_per_s", rows)}


def _pretrain(d: Path, preset_name: str, seed: int, steps: int, device: str = "cpu", nproc: int = 1,
              bf16: bool = False) -> dict:
    a = TrainArgs(out=str(d), preset=preset_name, steps=steps, seed=seed, save_every=max(steps // 3, 1),
                  eval_every=max(steps // 6, 1), sample_every=max(steps // 3, 1), seq_len=SEQ, batch_size=BATCH * nproc,
                  warmup=max(steps // 15, 1), data_bytes=4 << 20, resume=True, device=device, bf16=bf16)
    run = _train("pretrain", a, nproc)
    rows = read_metrics(run)
    val = [r for r in rows if "val_loss" in r]
    r = {"steps": steps, "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
         "val_loss": val[-1]["val_loss"], "val_bpb": val[-1]["val_bpb"],
         "tokens_per_s": round(sum(x["tokens_per_s"] for x in rows[1:]) / max(len(rows) - 1, 1)),
         "tokenizer_bytes_per_token": round(json.loads((run / "tokenizer" / "stats.json").read_text())
                                            ["heldout_bytes_per_token"], 3),
         "expert_load_max_over_mean": [round(x, 2) for x in rows[-1]["expert_load_max_over_mean"]]}
    model, tok = load(run / "model", dtype=torch.float32, device=device), load_tokenizer(run / "model")
    r["tokens"] = steps * a.batch_size * SEQ
    r["flops"] = 3 * _flops_per_token(run) * r["tokens"]
    held_out = "\n\n".join(p.text() for p in get_task(TASK).problems("test", 100, seed))
    loads = expert_loads(model, tok.encode(held_out))
    plot_expert_heatmap(loads, d / "expert_heatmap.png")
    E = len(loads[0])
    r["expert_share_max_over_uniform"] = [round(max(row) * E, 2) for row in loads]
    s = model_stats(model.config)
    r.update(params=s["params"], active_params=s["active_params"], kv_latent_bytes=s["kv"]["latent"],
             kv_naive_bytes=s["kv"]["naive"])
    r["transformers"] = _transformers_parity(run / "model", model, tok)
    prompt = tok.encode(QUESTION)
    engines = {spec: Engine(model, tok, speculative=spec) for spec in (False, True)}
    rates = {spec: [] for spec in engines}
    for eng in engines.values():
        eng.generate([prompt], max_new_tokens=8)  # warm up
    for _ in range(3):  # plain and speculative take turns (a small machine's speed drifts within a minute)
        for spec, eng in engines.items():
            t0 = time.perf_counter()
            answer = eng.generate([prompt], max_new_tokens=64)[0]
            rates[spec].append(len(answer) / (time.perf_counter() - t0))
    stats = engines[True].spec_stats
    r.update(answer=tok.decode(answer), tok_per_s=round(statistics.median(rates[False]), 1),
             speculative_tok_per_s=round(statistics.median(rates[True]), 1),
             speculative_speedup=round(statistics.median(a / b for a, b in zip(rates[True], rates[False])), 2),
             mtp_acceptance=round(stats["accepted"] / max(stats["drafted"], 1), 3))
    return r


def _train(verb: str, a, nproc: int) -> Path:
    """The training verb `verb` (pretrain, sft, grpo, distill) with the arguments `a`: in this process, or in nproc
    torchrun processes on this machine; its run folder."""
    if nproc == 1:
        return {"pretrain": pretrain, "sft": sft, "grpo": grpo, "distill": distill}[verb](a)
    return _torchrun(verb, a, nproc)


def _torchrun(verb: str, a, nproc: int) -> Path:
    """`sobre VERB` with the arguments `a` in nproc torchrun processes on this machine; its run folder."""
    from .flags import dataclass_argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--no-python", sys.executable, "-m", "sobre", verb, *dataclass_argv(a)]
    if subprocess.run(cmd).returncode:
        raise RuntimeError(f"{verb} under torchrun failed (its output is above): {' '.join(cmd)}")
    return Path(a.out)


def _transformers_parity(path: Path, model, tok) -> dict:
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()  # it would list our MTP tensors, which it does not use, as unexpected
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'sobre[test]')"}
    dev = next(model.parameters()).device
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    prompt = tok.encode(QUESTION)
    x = torch.tensor([tok.encode(QUESTION + "12 + 7 = 19")], device=dev)
    with torch.no_grad():
        ref = model(x)
        diff = (hf(x).logits - ref).abs().max().item()
        theirs = hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    ours = Engine(model).generate([prompt], max_new_tokens=24)[0]
    return {"logits_max_diff": diff, "logit_scale": ref.abs().max().item(), "greedy_tokens_equal": theirs == ours}


def _distill(d: Path, out: Path, preset_name: str, steps: int, baseline: int, seed: int, device: str = "cpu",
             bf16: bool = False, nproc: int = 1) -> dict:
    # students from random weights learn the columns late (at 200 steps both sat near 0.05; at 300 the distilled
    # one reached 0.13-0.40, the baseline 0.10-0.25, by run and seed; at 450, 0.71 and 0.32: README): 450 steps
    # by default, on 3000 problems
    common = dict(arch="qwen2", preset=preset_name, task=(TASK,), examples=min(3000, steps * 10), direct=DIRECT,
                  steps=steps, batch_size=16, seq_len=256, lr=2e-3,
                  warmup=20, eval_every=max(steps // 2, 1), save_every=max(steps // 2, 1), seed=seed, resume=True,
                  device=device, bf16=bf16)
    student = _train("distill", DistillArgs(out=str(d / "student"), teacher=str(out / "grpo"), samples=1,
                                            with_reference=True, max_new_tokens=128, **common), nproc)
    r = {"student": _finished(student, 16 * 256)}
    if baseline:  # the same student on the task's own traces, no teacher: its tokenizer (a fresh run reuses it)
        if not (d / "baseline" / "tokenizer").exists():
            load_tokenizer(out / "grpo" / "model").save(d / "baseline" / "tokenizer")
        r["baseline"] = _finished(_train("sft", SFTArgs(out=str(d / "baseline"), **common), nproc), 16 * 256)
    return r


def _evaluate(d: Path, out: Path, n: int, seed: int, device: str = "cpu") -> dict:
    """{model: {"params", task: evaluate_task's record, "sampled": R1's pass@1 record}}: every stage's model on
    every EVAL_TASKS task, greedy (the trained task gets n problems, the others n // 2); every one but the
    pretrained model (it has yet to answer) also on the trained task's n problems, EVAL_SAMPLES samples each at
    R1's sampling."""
    d.mkdir(parents=True, exist_ok=True)
    r = {}
    models = {"pretrain": out / "pretrain", "sft": out / "sft", "grpo": out / "grpo",
              "distill": out / "distill" / "student", "distill_baseline": out / "distill" / "baseline"}
    for name, path in models.items():
        if not (path / "model").exists():  # no baseline student in a budget-sized run
            continue
        model, tok = start_model(str(path), device=device)
        r[name] = {"params": model_stats(model.config)["params"]}
        for t in EVAL_TASKS:
            r[name][t] = evaluate_task(model.eval(), tok, get_task(t), n if t == TASK else max(n // 2, 1),
                                       max_new_tokens=128, seed=seed)
        if name != "pretrain":
            r[name]["sampled"] = evaluate_task(model, tok, get_task(TASK), n, EVAL_SAMPLES, max_new_tokens=128,
                                               seed=seed)
    return r


WATTS_PER_CORE = 15  # a typical busy server / laptop core; an estimate, not a measurement
WATTS_PER_GPU = 700  # an H100 / H200 SXM's board power
CORES = os.cpu_count() or 1
MODELS = {"pretrain": "pretrain", "sft": "sft", "grpo": "grpo", "distill": "student (distilled)",
          "distill_baseline": "student (no teacher)"}


def report(out: Path) -> str:
    """report.md + report.json from the stages' stage.json files; returns the markdown (`sobre report DIR`)."""
    out = Path(out)
    r = json.loads((out / "speedrun.json").read_text())
    for name in STAGES:
        r[name] = json.loads((out / name / "stage.json").read_text())
    total = sum(r[s]["minutes"] for s in STAGES)
    summary = {"preset": r["preset"], "seed": r["seed"], "task": r["task"], "direct": r.get("direct", 0),
               "wall_time_s": round(total * 60, 1),
               "stages": {s: r[s] for s in STAGES if s != "eval"},
               "eval": {m: {t: v[t]["pass@1"] for t in EVAL_TASKS} | ({"r1_pass@1": v["sampled"]["pass@1"]}
                                                                       if "sampled" in v else {})
                        for m, v in r["eval"].items() if isinstance(v, dict)}}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    p, t = r["pretrain"], r["pretrain"]["transformers"]
    left_out = cuts(r["plan"]) if r.get("minutes_budget") and "plan" in r else ""
    size = f"; sized for {r['minutes_budget']:g} minutes on this machine: {left_out}" if left_out else ""
    dev, nproc = r.get("device", "cpu"), r.get("nproc", 1)
    where = f", {dev}" + (f", training in {nproc} processes" if nproc > 1 else "")
    where += ", bf16 autocast" if r.get("bf16") else ", fp32"
    where += f" ({precision_note(r['step_seconds'])})" if r.get("step_seconds") else ""
    lines = [f"# sobre speedrun report ({r['preset']}, seed {r['seed']}{where}{size})", "",
             "| stage | minutes | result |", "|---|---|---|",
             f"| pretrain | {p['minutes']} | {p['steps']} steps at {p['tokens_per_s']} tok/s; loss "
             f"{p['first_loss']:.2f} -> {p['final_loss']:.2f}; val loss {p['val_loss']:.3f} ({p['val_bpb']:.3f} "
             f"bits/byte); tokenizer {p['tokenizer_bytes_per_token']} bytes/token; expert load max/mean "
             f"{p['expert_load_max_over_mean']} |",
             f"| model | | {p['params']:,} params, {p['active_params']:,} active/token; KV cache "
             f"{p['kv_latent_bytes']} B/token latent vs {p['kv_naive_bytes']} B/token full K/V |",
             f"| expert balance | | busiest expert's share of routed tokens over a uniform share, per MoE layer, on "
             f"held-out problems: {p.get('expert_share_max_over_uniform')} (`pretrain/expert_heatmap.png`) |"]
    if "skipped" in t:
        lines.append(f"| transformers parity | | skipped: {t['skipped']} |")
    else:
        lines.append(f"| transformers parity | | max logit diff {t['logits_max_diff']:.2e} (scale "
                     f"{t['logit_scale']:.1f}); greedy tokens equal: {t['greedy_tokens_equal']} |")
    lines.append(f"| generate | | {p['tok_per_s']} tok/s; MTP speculative {p['speculative_tok_per_s']} tok/s "
                 f"({p['speculative_speedup']}x, the median of 3 paired rounds; acceptance "
                 f"{p['mtp_acceptance']:.0%}) |")
    s, g = r["sft"], r["grpo"]
    lines.append(f"| sft | {s['minutes']} | {s['steps']} steps; loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}; "
                 f"{r.get('direct', 0):.0%} of the traces answer without worked steps |")
    curve = ", ".join(f"{p:.2f}" for _, p in g["heldout_pass@1"])
    k = g.get("heldout_samples", 1)
    lines.append(f"| grpo | {g['minutes']} | {g['steps']} steps at {g['samples_per_s']:.1f} samples/s; train accuracy "
                 f"{g['train_accuracy_first']:.2f} -> {g['train_accuracy_last']:.2f}, completions that think "
                 f"{g.get('thinking_first', 1):.2f} -> {g.get('thinking_last', 1):.2f} (first / last fifth); held-out "
                 f"pass@1 ({'greedy' if k == 1 else f'R1: {k} samples a problem'}) every "
                 f"{g['heldout_pass@1'][1][0] if len(g['heldout_pass@1']) > 1 else '-'} steps: {curve} |")
    dd = r["distill"]
    lines.append(f"| distill | {dd['minutes']} | dense student {dd['student']['steps']} steps; "
                 + (f"the same student without teacher {dd['baseline']['steps']} steps |" if "baseline" in dd else
                    "no student without teacher (left out to fit the budget) |"))
    gpus = nproc if dev.startswith("cuda") else 0  # (runs from before stage.json's "processes": pretraining alone)
    watts = {s: r[s].get("processes", nproc if s == "pretrain" else 1) * WATTS_PER_GPU if gpus
             else CORES * WATTS_PER_CORE for s in STAGES}
    power = f"{WATTS_PER_GPU} W per busy GPU" if gpus else f"{WATTS_PER_CORE} W per busy core, {CORES} cores"
    lines += ["", f"Cost (FLOPs estimated from the active parameters; energy assumes {power}: there is no power "
              "meter here):", "",
              "| stage | tokens | FLOPs | energy (Wh) |", "|---|---|---|---|"]
    for name in ("pretrain", "sft", "grpo", "distill"):
        v = r[name] if name != "distill" else {k: sum(x.get(k, 0) for x in r[name].values() if isinstance(x, dict))
                                               for k in ("tokens", "flops")}
        wh = r[name]["minutes"] / 60 * watts[name]
        lines.append(f"| {name} | {v.get('tokens', 0):,} | {v.get('flops', 0):.2e} | {wh:.1f} |")
    e = r["eval"]
    sizes = ", ".join(f"`{t}` {e['pretrain'][t]['problems']}" for t in EVAL_TASKS)
    s1 = e.get("sft", {}).get("sampled")  # (runs from before it was measured have none)
    r1 = f"R1's pass@1 (`{TASK}`, {s1['samples']} samples a problem at T {s1['temperature']:g}, top-p " \
         f"{s1['top_p']:g})" if s1 else ""
    lines += ["", f"Held-out pass@1 (greedy; problems: {sizes}; trained on `{r['task']}` only; {e['minutes']} min)"
              + (f" and {r1}: the mean correctness of the samples, as DeepSeek-R1 reports pass@1" if s1 else "") + ":",
              "", "| model | params | " + " | ".join(f"`{t}`" for t in EVAL_TASKS) + (" | R1's pass@1" if s1 else "")
              + f" | format (`{TASK}`) |", "|---|---|" + "---|" * (len(EVAL_TASKS) + 1 + bool(s1))]
    for name, v in e.items():
        if isinstance(v, dict):
            lines.append(f"| {MODELS.get(name, name)} | {v['params']:,} | "
                         + " | ".join(f"{v[t]['pass@1']:.3f}" for t in EVAL_TASKS)
                         + (f" | {v['sampled']['pass@1']:.3f}" if "sampled" in v else " | -" if s1 else "")
                         + f" | {v[TASK]['format']:.2f} |")
    pairs = [(m, ref, key) for m, ref in (("grpo", "sft"), ("distill", "distill_baseline")) for key in (TASK, "sampled")
             if "solved" in e.get(m, {}).get(key, {}) and "solved" in e.get(ref, {}).get(key, {})]
    if pairs:  # (runs from before "solved" was recorded have no per-problem results)
        lines += ["", f"Paired on the same `{TASK}` problems (exact sign test over the problems one model solves "
                  "(more often) and the other does not (as often); p: how likely a split this uneven is if neither "
                  "were better):", ""]
    for m, ref, key in pairs:
        a, b = e[m][key], e[ref][key]
        t = sign_test(a["solved"], b["solved"])
        how = ("greedy", "solved only by") if key == TASK else ("R1's pass@1", "solved more often by")
        lines.append(f"- {MODELS[m]} vs {MODELS[ref]}, {how[0]}: {100 * (a['pass@1'] - b['pass@1']):+.0f} points, "
                     f"{t['better']} problems {how[1]} the first, {t['worse']} by the second; p = {t['p']:.2g}")
    lines += ["", f"Total {total:.1f} minutes. Plots: `pretrain/loss.png`, `pretrain/expert_load.png`, "
              "`pretrain/expert_heatmap.png`, `sft/loss.png`, `grpo/reward.png`, `distill/student/loss.png`.",
              "", "Pretrained model's answer to `What is 12 + 7?`:", "", "```", QUESTION + p["answer"], "```",
              "", f"Chat with the result: `sobre chat {out / 'grpo' / 'model'}`"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
