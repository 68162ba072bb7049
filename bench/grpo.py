"""GRPO throughput: sobre's `grpo` vs TRL's GRPOTrainer on the same model (exported to HF format), the same
prompts (countdown), reward, G, completion length, beta=0, fp32, in the same run. Samples/s = completions per
second of whole GRPO steps (rollout + reward + update), median over the measured steps. Each side's split: sobre's
rollout / update seconds from its metrics, TRL's seconds in its generation (`GRPOTrainer._generate`) / the rest of
its step (scoring, log-probs, backward, optimizer).

The reward is countdown's correctness plus a small score that differs between completions, so that a random
model's groups do not all score 0: sobre leaves completions with advantage 0 out of its update (TRL trains on
them all), so with countdown's reward alone a fresh model's update would train on nothing. `--reward spread`
(the default): 0.1 x a hash of the text in [0, 1), every completion trained by both sides (equal work);
`--reward digits`: 0.1 x the share of digits, which many random completions lack (groups of equal rewards).
`--bf16`: both sides' generation and update in bf16 (TRL's bf16=True runs its generation under the same
autocast as its update: checked with a hook on its LM head; sobre's rollouts then run on bf16 copies of the weights,
`grpo --rollout-bf16`, its update under autocast, `--bf16`). TRL's GRPOConfig sets bf16=True unless fp16 is set
(TRL 1.16): `--bf16` is TRL at its defaults, the fp32 default here the stricter comparison.
    pip install -e ".[bench]"   # TRL, the baseline: not a sobre dependency
    python bench/grpo.py [--init MODEL_DIR] [--steps 4] [--prompts 8] [--group 8] [--max-new-tokens 64] [--rounds 2]
                         [--reward spread|digits] [--onednn auto|on|off] [--device cpu|cuda]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

import sobre
from sobre.data import builtin_docs
from sobre.grpo import GRPOArgs, grpo
from sobre.parallel import keep_freed_memory
from sobre.rollout import prompt_ids
from sobre.tasks import get_task
from sobre.tokenizer import train_tokenizer


def fresh_model(path: Path, preset: str):
    tok = train_tokenizer(builtin_docs(1 << 20), sobre.preset(preset).vocab_size, path)
    cfg = sobre.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    sobre.save(sobre.init_weights(sobre.Transformer(cfg)), path, tokenizer_dir=path)


def spread_reward(completion: str, answer: str) -> float:
    """Countdown's correctness + 0.1 x a hash of the completion in [0, 1) (both sides score with it)."""
    return get_task("countdown").correct(completion, answer) + 0.1 * zlib.crc32(completion.encode()) / 2**32


def digits_reward(completion: str, answer: str) -> float:
    """Countdown's correctness + 0.1 x the share of digits in the completion."""
    return get_task("countdown").correct(completion, answer) + 0.1 * sum(map(str.isdigit, completion)) / max(
        len(completion), 1)


def countdown_jsonl(path: Path, n: int) -> Path:
    """Countdown problems as a JSONL task (a built-in task takes no reward function)."""
    task = get_task("countdown")  # (and a few held-out ones for the run's step-0 evaluation)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems("train", n) + task.problems("test", 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_sobre(model_dir, a, out):
    task = str(countdown_jsonl(out.parent / f"{out.name}.jsonl", a.prompts * (a.steps + 1) * 4))
    args = GRPOArgs(out=str(out), init=str(model_dir), task=task, reward=f"grpo:{a.reward}_reward",
                    steps=a.steps + 1, prompts=a.prompts, group=a.group, max_new_tokens=a.max_new_tokens, beta=0.0,
                    eval_every=10_000, eval_problems=1, save_every=10_000, lr=1e-5,
                    micro_batch=a.prompts * a.group, bf16=a.bf16,  # one forward, as TRL's batch
                    rollout_bf16=a.bf16, device=a.device,  # TRL's bf16=True generates under its autocast
                    rollout_is="none")  # (TRL weighs vLLM's rollouts only: the same algorithm on both sides)
    grpo(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # 1st warms up
    split = {k: statistics.median(r[k] for r in rows) for k in ("rollout_s", "update_s", "signal")}
    length = statistics.mean(r["completion_length"] for r in rows)
    return statistics.median(r["samples_per_s"] for r in rows), length, split


def run_trl(model_dir, a, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer
    logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    task, score = get_task("countdown"), globals()[f"{a.reward}_reward"]
    ours = sobre.load_tokenizer(model_dir)
    problems = task.problems("train", a.prompts * (a.steps + 1))
    data = Dataset.from_list([{"prompt": ours.decode(prompt_ids(ours, p)), "answer": p.answer} for p in problems])
    lengths, times = [], []

    def reward(completions, answer, **kw):
        return [score(c, r) for c, r in zip(completions, answer)]

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                     max_completion_length=a.max_new_tokens, beta=0.0, learning_rate=1e-5, max_steps=a.steps + 1,
                     use_cpu=a.device == "cpu", bf16=a.bf16, logging_steps=1, report_to=[], save_strategy="no",
                     temperature=1.0, loss_type="grpo", shuffle_dataset=False, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    gen = []  # seconds in TRL's generation per step (its internal _generate, where this TRL version has one)
    if hasattr(trainer, "_generate"):
        def timed(*args, f=trainer._generate):
            t0 = time.perf_counter()
            out = f(*args)
            gen.append(time.perf_counter() - t0)
            return out
        trainer._generate = timed
    trainer.train()
    step = statistics.median(times[1:])
    generating = statistics.median(gen[1:]) if len(gen) > 1 else None
    split = (generating, step - generating) if generating is not None else None
    return a.prompts * a.group / step, statistics.mean(lengths), split


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--init", help="HF model directory with tokenizer (default: a fresh tiny model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=4, help="measured GRPO steps (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reward", choices=("spread", "digits"), default="spread",
                   help="countdown + 0.1 x a hash of the text (spread) or x its share of digits (see above)")
    p.add_argument("--bf16", action="store_true",
                   help="both sides in bf16: TRL's bf16=True (its generation and update under autocast), sobre's "
                        "--bf16 (the update under autocast) and --rollout-bf16 (rollouts on bf16 weights)")
    p.add_argument("--onednn", choices=("auto", "on", "off"), default="auto",
                   help="sobre's fp32 products on oneDNN: this CPU's default (sobre.linear.ONEDNN: AMD CPUs with "
                        "AVX-512; few-row products by large weights on any AMD CPU) or forced on (every product "
                        "from ONEDNN_MACS up) / off (none) (TRL's products are torch's own either way)")
    p.add_argument("--device", default="cpu", help="both sides' device: cpu, or cuda (TRL on accelerate's GPU)")
    p.add_argument("--rounds", type=int, default=2,
                   help="sobre then TRL, this many times (a drifting machine moves both alike within a round)")
    a = p.parse_args()
    if a.device == "cpu":
        keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    if a.onednn != "auto":
        sobre.linear.ONEDNN = a.onednn == "on" and torch.backends.mkldnn.is_available()
        if not sobre.linear.ONEDNN:  # off: no product on oneDNN, the few-row ones neither
            sobre.linear.DNN_ROWS = 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(a.init) if a.init else tmp / "model"
        if not a.init:
            fresh_model(model_dir, a.preset)
        for r in range(a.rounds):
            ours, ours_len, split = run_sobre(model_dir, a, tmp / f"sobre{r}")
            theirs, theirs_len, their_split = run_trl(model_dir, a, tmp / f"trl{r}")
            rows.append((theirs, ours, split, their_split, theirs_len, ours_len))
    few = " (few rows by a large weight: oneDNN)" if sobre.linear.DNN_ROWS and not sobre.linear.ONEDNN else ""
    where = (f"{torch.get_num_threads()} threads, sobre's fp32 products on "
             f"{'oneDNN' if sobre.linear.ONEDNN else 'MKL'}{few}" if a.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"\nGRPO, {a.prompts} prompts x G={a.group}, <= {a.max_new_tokens} new tokens, beta=0, "
          f"{'bf16 autocast' if a.bf16 else 'fp32'}, {a.reward} reward, {where} "
          f"({'model ' + a.init if a.init else 'fresh ' + a.preset + ' model'})")
    print("| round | TRL samples/s | sobre samples/s | sobre / TRL | sobre rollout / update s | TRL generation / "
          "rest s | mean completion tokens TRL / sobre | sobre: share trained |")
    print("|---|---|---|---|---|---|---|---|")
    for r, (theirs, ours, split, their_split, theirs_len, ours_len) in enumerate(rows, start=1):
        trl = f"{their_split[0]:.2f} / {their_split[1]:.2f}" if their_split else "-"
        print(f"| {r} | {theirs:.1f} | {ours:.1f} | **{ours / theirs:.2f}x** | {split['rollout_s']:.2f} / "
              f"{split['update_s']:.2f} | {trl} | {theirs_len:.1f} / {ours_len:.1f} | {split['signal']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
