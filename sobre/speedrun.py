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
             (no teacher), for comparison
  eval       held-out pass@1 of every stage's model
-> report.md (+ the stages' PNG plots).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import load
from .config import Config, preset
from .distill import DistillArgs, distill
from .engine import Engine
from .grpo import GRPOArgs, grpo
from .model import Transformer, init_weights
from .report import expert_loads, plot_expert_heatmap, read_metrics
from .rollout import evaluate_task
from .sft import SFTArgs, sft, start_model
from .stats import model_stats
from .tasks import get_task
from .tokenizer import load_tokenizer
from .train import TrainArgs, losses, pretrain

QUESTION = "Question: What is 12 + 7?\n<think>\n"
# each stage's share of the default run's wall time (README, 2-core CPU): the pipeline ETA scales these
SHARES = {"pretrain": 0.137, "sft": 0.286, "grpo": 0.155, "distill": 0.404, "eval": 0.018}
TASK = "arithmetic:1"  # two-digit + and -: within reach of a tiny model in minutes
DIRECT = 0.5  # share of the cold-start traces without worked steps; the rest work the columns out in <think>
EVAL_TASKS = (TASK, "arithmetic:2", "sorting:1")  # the trained task, a harder level of it, one it never saw
STEPS = 300  # the default run: pretraining steps (SFT 1.5x, GRPO 2/15, distillation 1x)
PRETRAIN_COST = 330  # the pretraining stage's wall time (tokenizer, checks, engine timing included) in steps
BATCH, SEQ = 8, 256  # the pretraining batch


def rest_cost(step_s: float) -> float:
    """Wall time of the default run's later stages (SFT, GRPO, distillation, eval) over one pretraining step's,
    for a machine that pretrains at step_s seconds per step: 1833 measured at 0.74 s (runs/speedrun16), 2090 at
    1.21 s (runs/speedrun17, scaled to 300 steps): slower machines lose more on rollouts and small students."""
    return 1833 + 554 * max(step_s - 0.743, 0.0)


def speedrun(out: Path, preset_name: str = "tiny", seed: int = 0, steps: int | None = None, force: bool = False,
             eval_problems: int = 100, minutes: float = 30.0) -> dict:
    """`steps` sets the size of the run: pretraining steps; SFT, GRPO and distillation scale with it. None: the
    default recipe (STEPS), cut down where this machine could not run it in `minutes` (see `fit_steps`)."""
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "speedrun.json").read_text()) if (out / "speedrun.json").exists() else {}
    later, sized = steps, steps is None  # later: the size of the stages after pretraining
    if sized:  # a resumed run keeps the sizes it started with
        resumed = "steps" in old and not force
        steps = old["steps"] if resumed else fit_steps(preset_name, minutes)
        later = old.get("later_steps") if resumed else None  # set from pretraining's pace
    results: dict = {"preset": preset_name, "seed": seed, "task": TASK, "direct": DIRECT, "steps": steps,
                     "minutes_budget": minutes if sized else None}
    (out / "speedrun.json").write_text(json.dumps(results) + "\n")

    start, ran = time.perf_counter(), []  # ran: stages this invocation has timed, for the ETA

    def stage(name: str, fn):
        done = out / name / "stage.json"
        if done.exists() and not force and current(name, json.loads(done.read_text())):
            results[name] = json.loads(done.read_text())
            print(f"speedrun: {name} already done ({done}); --force redoes it")
            return
        if force and (out / name).exists():
            shutil.rmtree(out / name)
        print(f"speedrun: stage {list(SHARES).index(name) + 1}/{len(SHARES)} {name}" + eta(), flush=True)
        t0 = time.perf_counter()
        r = fn(out / name)
        r["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        r["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        done.write_text(json.dumps(r, indent=2) + "\n")
        results[name] = r
        ran.append(name)

    def current(name: str, r: dict) -> bool:  # a finished eval from an older sobre may lack today's tasks
        return name != "eval" or all(t in r.get("pretrain", {}) for t in EVAL_TASKS)

    def eta() -> str:
        """Time left for the stages still to run, from the pace of those this invocation ran so far."""
        if not ran:
            return ""
        pace = (time.perf_counter() - start) / sum(SHARES[n] for n in ran)  # seconds per unit of share
        left = sum(v for n, v in SHARES.items() if n not in results)
        return f" (elapsed {(time.perf_counter() - start) / 60:.1f} min, about {pace * left / 60:.1f} min to go)"

    stage("pretrain", lambda d: _pretrain(d, preset_name, seed, steps))
    results["later_steps"] = later = later or fit_later(results["pretrain"], minutes)
    (out / "speedrun.json").write_text(json.dumps({k: v for k, v in results.items() if k not in STAGES}) + "\n")
    steps = later
    stage("sft", lambda d: _finished(sft(SFTArgs(
        out=str(d), init=str(out / "pretrain"), task=(TASK,), examples=min(5000, steps * 20), direct=DIRECT,
        steps=steps * 3 // 2, batch_size=16, seq_len=256, lr=2e-3, warmup=20, eval_every=max(steps // 2, 1),
        save_every=max(steps // 2, 1), seed=seed, resume=True)), 16 * 256))
    stage("grpo", lambda d: _grpo_summary(grpo(GRPOArgs(
        out=str(d), init=str(out / "sft"), task=TASK, steps=max(steps * 2 // 15, 2), prompts=8, group=8,
        max_new_tokens=128, loss="dapo", lr=5e-5, warmup=max(steps // 30, 1),  # Adam's first steps hurt most
        min_lr_ratio=0.1,  # cosine decay: the policy switches to thinking early; later updates are mostly noise
        format_weight=0.0,  # the reward is correctness alone: whatever thinks more has to earn it
        eval_every=max(steps // 60, 1), eval_problems=eval_problems,
        save_every=max(steps // 24, 1), seed=seed, resume=True)), 8 * 8))
    stage("distill", lambda d: _distill(d, out, preset_name, steps, seed))
    stage("eval", lambda d: _evaluate(d, out, eval_problems, seed))
    print(report(out))
    return results


def fit_steps(preset_name: str, minutes: float) -> int:
    """The default size (STEPS) if this machine runs it within 90% of `minutes`, else a proportionally smaller one.
    The estimate times a few pretraining steps of the run's model here (2-core CPUs differ by 1.7x and more) and
    scales them by the measured cost of a default run in such steps."""
    step_s = pretrain_step_seconds(preset_name)
    estimate = (PRETRAIN_COST + rest_cost(step_s)) * step_s / 60  # minutes at STEPS
    steps = sized_steps(estimate, 0.9 * minutes)
    print(f"speedrun: a pretraining step takes {step_s:.2f} s here, so the default run ({STEPS} steps) would take "
          f"about {estimate:.0f} minutes; running {steps} steps to fit {minutes:g} minutes (--steps sets it)")
    return steps


def fit_later(p: dict, minutes: float) -> int:
    """The size of the stages after pretraining (SFT, GRPO, distillation, eval): STEPS if they fit what is left
    of the budget at the pace pretraining measured here (finer than fit_steps' estimate), else less. No margin:
    SFT and the students learn the arithmetic late (301 SFT steps gave 0.01 held-out, 450 gave 0.28-0.50), so a
    smaller run loses the gain, and shrinks only where the full one clearly would not fit."""
    step_s = BATCH * SEQ / p["tokens_per_s"]
    left = minutes - p["minutes"]
    estimate = rest_cost(step_s) * step_s / 60  # minutes at STEPS
    steps = sized_steps(estimate, left)
    if steps < STEPS:
        print(f"speedrun: pretraining ran at {step_s:.2f} s/step: the later stages at {STEPS} steps would take "
              f"about {estimate:.0f} minutes, {left:.0f} are left; running them at {steps} steps")
    return steps


def sized_steps(estimate: float, room: float) -> int:
    """STEPS if a run estimated at `estimate` minutes (at STEPS) fits `room` minutes, else proportionally fewer
    (at least 30)."""
    return STEPS if estimate <= room else max(int(STEPS * room / estimate), 30)


def pretrain_step_seconds(preset_name: str, reps: int = 5) -> float:
    """Seconds of one pretraining step (forward with MTP, backward, AdamW; the median of `reps`) of a fresh
    preset model on the speedrun's pretraining batch (random tokens); leaves the global RNG alone."""
    cfg, times = preset(preset_name), []
    with torch.random.fork_rng():
        model = init_weights(Transformer(cfg), seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
        for _ in range(reps + 2):  # the first two warm up
            t0 = time.perf_counter()
            losses(model, x[:, :-1], x[:, 1:], TrainArgs())["total"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return sorted(times[2:])[reps // 2]


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

    tokens = round(sum(r["completion_length"] * samples_per_step * r.get("rollout_rounds", 1) for r in rows))
    return {"tokens": tokens, "flops": 4 * _flops_per_token(run) * tokens, "steps": rows[-1]["step"],
            "folder": str(run), "heldout_pass@1": [(e["step"], e["pass@1"]) for e in evals],
            "train_accuracy_first": mean("accuracy", rows[:k]), "train_accuracy_last": mean("accuracy", rows[-k:]),
            "thinking_first": mean("format", rows[:k]),  # completions with worked steps
            "thinking_last": mean("format", rows[-k:]), "samples_per_s": mean("samples_per_s", rows)}


def _pretrain(d: Path, preset_name: str, seed: int, steps: int) -> dict:
    run = pretrain(TrainArgs(out=str(d), preset=preset_name, steps=steps, seed=seed, save_every=max(steps // 3, 1),
                             eval_every=max(steps // 6, 1), sample_every=max(steps // 3, 1), seq_len=SEQ,
                             batch_size=BATCH, warmup=max(steps // 15, 1), data_bytes=4 << 20, resume=True))
    rows = read_metrics(run)
    val = [r for r in rows if "val_loss" in r]
    r = {"steps": steps, "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
         "val_loss": val[-1]["val_loss"], "val_bpb": val[-1]["val_bpb"],
         "tokens_per_s": round(sum(x["tokens_per_s"] for x in rows[1:]) / max(len(rows) - 1, 1)),
         "tokenizer_bytes_per_token": round(json.loads((run / "tokenizer" / "stats.json").read_text())
                                            ["heldout_bytes_per_token"], 3),
         "expert_load_max_over_mean": [round(x, 2) for x in rows[-1]["expert_load_max_over_mean"]]}
    model, tok = load(run / "model", dtype=torch.float32), load_tokenizer(run / "model")
    r["tokens"] = steps * BATCH * SEQ
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
    prompt, rates = tok.encode(QUESTION), {}
    for spec in (False, True):
        eng = Engine(model, tok, speculative=spec)
        eng.generate([prompt], max_new_tokens=8)  # warm up
        t0 = time.perf_counter()
        answer = eng.generate([prompt], max_new_tokens=64)[0]
        rates[spec] = len(answer) / (time.perf_counter() - t0)
        if spec:
            r["mtp_acceptance"] = round(eng.spec_stats["accepted"] / max(eng.spec_stats["drafted"], 1), 3)
    r.update(answer=tok.decode(answer), tok_per_s=round(rates[False], 1), speculative_tok_per_s=round(rates[True], 1),
             speculative_speedup=round(rates[True] / rates[False], 2))
    return r


def _transformers_parity(path: Path, model, tok) -> dict:
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()  # it would list our MTP tensors, which it does not use, as unexpected
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'sobre[test]')"}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tok.encode(QUESTION)
    x = torch.tensor([tok.encode(QUESTION + "12 + 7 = 19")])
    with torch.no_grad():
        ref = model(x)
        diff = (hf(x).logits - ref).abs().max().item()
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    ours = Engine(model).generate([prompt], max_new_tokens=24)[0]
    return {"logits_max_diff": diff, "logit_scale": ref.abs().max().item(), "greedy_tokens_equal": theirs == ours}


def _distill(d: Path, out: Path, preset_name: str, steps: int, seed: int) -> dict:
    # students from random weights learn the columns late (at 200 steps both sat near 0.05; at 300 the distilled
    # one reached 0.31, the baseline 0.15): they get as many steps as pretraining, on 3000 problems
    common = dict(arch="qwen2", preset=preset_name, task=(TASK,), examples=min(3000, steps * 10), direct=DIRECT,
                  steps=steps, batch_size=16, seq_len=256, lr=2e-3,
                  warmup=20, eval_every=max(steps // 2, 1), save_every=max(steps // 2, 1), seed=seed, resume=True)
    student = distill(DistillArgs(out=str(d / "student"), teacher=str(out / "grpo"), samples=1, with_reference=True,
                                  max_new_tokens=128, **common))
    tok = load_tokenizer(out / "grpo" / "model")
    baseline = sft(SFTArgs(out=str(d / "baseline"), **common), tokenizer=tok)
    return {"student": _finished(student, 16 * 256), "baseline": _finished(baseline, 16 * 256)}


def _evaluate(d: Path, out: Path, n: int, seed: int) -> dict:
    """{model: {"params", task: evaluate_task's record}}: every stage's model on every EVAL_TASKS task (the
    trained task gets n problems, the others n // 2)."""
    d.mkdir(parents=True, exist_ok=True)
    r = {}
    models = {"pretrain": out / "pretrain", "sft": out / "sft", "grpo": out / "grpo",
              "distill": out / "distill" / "student", "distill_baseline": out / "distill" / "baseline"}
    for name, path in models.items():
        model, tok = start_model(str(path))
        r[name] = {"params": model_stats(model.config)["params"]}
        for t in EVAL_TASKS:
            r[name][t] = evaluate_task(model.eval(), tok, get_task(t), n if t == TASK else max(n // 2, 1),
                                       max_new_tokens=128, seed=seed)
    return r


STAGES = ("pretrain", "sft", "grpo", "distill", "eval")
WATTS_PER_CORE = 15  # a typical busy server / laptop core; an estimate, not a measurement
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
               "eval": {m: {t: v[t]["pass@1"] for t in EVAL_TASKS} for m, v in r["eval"].items()
                        if isinstance(v, dict)}}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    p, t = r["pretrain"], r["pretrain"]["transformers"]
    size = (f"; sized for {r['minutes_budget']:g} minutes on this machine: {r['steps']} pretraining steps, later "
            f"stages at {r['later_steps']}" if r.get("minutes_budget") and min(r["steps"], r["later_steps"]) < STEPS
            else "")
    lines = [f"# sobre speedrun report ({r['preset']}, seed {r['seed']}{size})", "",
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
                 f"({p['speculative_speedup']}x, acceptance {p['mtp_acceptance']:.0%}) |")
    s, g = r["sft"], r["grpo"]
    lines.append(f"| sft | {s['minutes']} | {s['steps']} steps; loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}; "
                 f"{r.get('direct', 0):.0%} of the traces answer without worked steps |")
    curve = ", ".join(f"{p:.2f}" for _, p in g["heldout_pass@1"])
    lines.append(f"| grpo | {g['minutes']} | {g['steps']} steps at {g['samples_per_s']:.1f} samples/s; train accuracy "
                 f"{g['train_accuracy_first']:.2f} -> {g['train_accuracy_last']:.2f}, completions that think "
                 f"{g.get('thinking_first', 1):.2f} -> {g.get('thinking_last', 1):.2f} (first / last fifth); held-out "
                 f"pass@1 every {g['heldout_pass@1'][1][0] if len(g['heldout_pass@1']) > 1 else '-'} steps: {curve} |")
    dd = r["distill"]
    lines.append(f"| distill | {dd['minutes']} | dense student {dd['student']['steps']} steps; baseline without "
                 f"teacher {dd['baseline']['steps']} steps |")
    lines += ["", f"Cost (FLOPs estimated from the active parameters; energy assumes {WATTS_PER_CORE} W per busy "
              f"core, {CORES} cores: this machine has no power meter):", "",
              "| stage | tokens | FLOPs | energy (Wh) |", "|---|---|---|---|"]
    for name in ("pretrain", "sft", "grpo", "distill"):
        v = r[name] if name != "distill" else {k: r[name]["student"].get(k, 0) + r[name]["baseline"].get(k, 0)
                                               for k in ("tokens", "flops")}
        wh = r[name]["minutes"] / 60 * CORES * WATTS_PER_CORE
        lines.append(f"| {name} | {v.get('tokens', 0):,} | {v.get('flops', 0):.2e} | {wh:.1f} |")
    e = r["eval"]
    sizes = ", ".join(f"`{t}` {e['pretrain'][t]['problems']}" for t in EVAL_TASKS)
    lines += ["", f"Held-out pass@1 (greedy; problems: {sizes}; trained on `{r['task']}` only; {e['minutes']} min):",
              "", "| model | params | " + " | ".join(f"`{t}`" for t in EVAL_TASKS) + f" | format (`{TASK}`) |",
              "|---|---|" + "---|" * (len(EVAL_TASKS) + 1)]
    for name, v in e.items():
        if isinstance(v, dict):
            lines.append(f"| {MODELS.get(name, name)} | {v['params']:,} | "
                         + " | ".join(f"{v[t]['pass@1']:.3f}" for t in EVAL_TASKS) + f" | {v[TASK]['format']:.2f} |")
    lines += ["", f"Total {total:.1f} minutes. Plots: `pretrain/loss.png`, `pretrain/expert_load.png`, "
              "`pretrain/expert_heatmap.png`, `sft/loss.png`, `grpo/reward.png`, `distill/student/loss.png`.",
              "", "Pretrained model's answer to `What is 12 + 7?`:", "", "```", QUESTION + p["answer"], "```",
              "", f"Chat with the result: `sobre chat {out / 'grpo' / 'model'}`"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
