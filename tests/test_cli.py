import json
import re
import subprocess
import sys

import pytest

import sobre
from sobre.cli import main
from sobre.constrain import JsonPrefix
from sobre.engine import Engine
from sobre.schema import SchemaPrefix

from conftest import random_model
from test_config import V3_RELEASE


def run(*args, check=True):
    """`python -m sobre ARGS` in a subprocess; check: an exit code other than 0 fails with the end of its stderr."""
    out = subprocess.run([sys.executable, "-m", "sobre", *args], capture_output=True, text=True)
    assert not check or out.returncode == 0, f"sobre {' '.join(args)}: exit {out.returncode}\n{out.stderr[-4000:]}"
    return out


def call(capsys, *args):
    """The CLI in this process (no interpreter and torch to start: each test keeps one `run` of the real entry
    point): (exit code, stdout, stderr); sys.exit(message) is code 1 with the message in stderr."""
    code, message = 0, ""
    try:
        main(list(args))
    except SystemExit as e:
        code, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    out, err = capsys.readouterr()
    return code, out, err + message


def test_help_on_every_verb(capsys):
    out = run("--help").stdout  # the installed entry point once; every verb's parser in this process
    listed = out.split("VERB\n", 1)[1].split("\noptions:", 1)[0]
    verbs = [line.split()[0] for line in listed.splitlines() if line.startswith("    ") and line[4] != " "]
    assert {"info", "convert", "generate", "chat", "serve", "pretrain", "sft", "grpo", "distill", "eval",
            "speedrun", "verify", "report"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0 and "usage: sobre " + verb in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a training verb's flags say what their dataclass's comments say
        main(["grpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rollout-is STR --rollout-bf16: each token's loss weighed" in text and "(default: sequence_mask)" in text
    assert "--lr FLOAT peak learning rate (default: 0.0001)" in text and "last 20% decays" in text


def test_dataclass_flags_give_back_the_dataclass():
    """A training verb's flags parse back the dataclass dataclass_argv wrote (speedrun's torchrun stages); a flag on
    by default turns off with --no-FLAG (sft's --packing)."""
    import argparse

    from sobre.cli import run_dataclass
    from sobre.flags import add_dataclass_flags, dataclass_argv
    from sobre.sft import SFTArgs
    p, got = argparse.ArgumentParser(), []
    add_dataclass_flags(p, SFTArgs)
    a = SFTArgs(packing=False, bf16=True, task=("countdown", "arithmetic"), lr=0.5, init="runs/x")
    run_dataclass(p.parse_args(dataclass_argv(a)), SFTArgs, lambda b: got.append(b) or "runs/x", "")
    assert got == [a] and "--no-packing" in dataclass_argv(a)
    assert p.parse_args([]).packing is True and p.parse_args(["--no-packing"]).packing is False
    from sobre.grpo import GRPOArgs  # tuples of numbers: typed, as many as the default holds
    p, got = argparse.ArgumentParser(), []
    add_dataclass_flags(p, GRPOArgs)
    a = GRPOArgs(sapo_temperatures=(2.0, 0.5), vespo_gamma=(1.0, 2.0, 3.0, 4.5), kl_correction=False,
                 rewards=("m:f", "m:g"), reward_weights=(0.5, 2.0))
    run_dataclass(p.parse_args(dataclass_argv(a)), GRPOArgs, lambda b: got.append(b) or "runs/x", "")
    assert got == [a] and p.parse_args(["--sapo-temperatures", "1", "3"]).sapo_temperatures == [1.0, 3.0]
    assert p.parse_args(["--reward-weights", "1", "0.5"]).reward_weights == [1.0, 0.5]  # (floats, the default empty)
    with pytest.raises(SystemExit):
        p.parse_args(["--sapo-temperatures", "1"])


def test_flag_help_comes_from_the_dataclass_comments():
    """field_help: a field's comment block above it, the comment ending its line and the `#   ` lines continuing
    it; a subclass's field its own comments only; no help from a docstring, a method or another field's lines."""
    from dataclasses import dataclass

    from sobre.flags import field_help

    @dataclass
    class Base:
        """A docstring: plain: int = 3"""
        plain: int = 3
        # about the next field
        above: str = "x"  # and its own line's: 50% of it
        tail: float = 1.0  # first part,
        #   its continuation
        # a block about `after`, not `tail`'s
        after: bool = False
        bare: int = 0  # overridden below

        def method(self):
            inner: int = 1  # not a field
            return inner

    @dataclass
    class Child(Base):
        bare: int = 1

    assert field_help(Child) == {"plain": "", "above": "about the next field and its own line's: 50% of it",
                                 "tail": "first part, its continuation",
                                 "after": "a block about `after`, not `tail`'s", "bare": ""}


def test_info_on_the_real_v3_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_RELEASE))
    out = run("info", str(tmp_path), "--json").stdout
    assert "params total          671.03B" in out
    assert "params active/token   37.55B" in out
    assert "576 values/layer" in out and "40960 values/layer" in out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["kv"]["latent"] == 576 * 61 * 2


def test_sampling_defaults_come_from_the_generation_config(tmp_path):
    """A flag left unset takes the checkpoint's generation_config.json value (DeepSeek-R1's temperature 0.6,
    top_p 0.95), else the verb's own default; `sobre generate` then samples as the Python API does with them."""
    from argparse import Namespace

    from sobre.flags import sampling_args
    from sobre.sampling import generation_defaults
    model = random_model()
    path = sobre.save(model, tmp_path / "m")
    assert generation_defaults(path) == {}  # sobre's own: token ids only
    unset = Namespace(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None)
    assert sampling_args(unset, path) == {} and sampling_args(unset, path, temperature=0.6) == {"temperature": 0.6}
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                            "top_k": 20, "bos_token_id": 0}))
    assert generation_defaults(path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    given = Namespace(**{**vars(unset), "top_p": 1.0, "repetition_penalty": 1.1})
    assert sampling_args(given, path, temperature=0.0) == {"temperature": 0.6, "top_k": 20, "top_p": 1.0,
                                                           "repetition_penalty": 1.1}
    out = run("generate", str(path), "--ids", "5,6,7", "--max-new-tokens", "8", "--seed", "3")
    want = Engine(model).generate([[5, 6, 7]], max_new_tokens=8, temperature=0.6, top_p=0.95, top_k=20, seed=3,
                                  stop_token_ids=(1,))[0]
    assert [int(t) for t in out.stdout.split()] == want
    (path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.json: sampling parameter temperature=-1"):
        generation_defaults(path)


def test_generate_greedy_ids_match_the_python_api(tmp_path, capsys):
    model = random_model(sobre.preset("debug", n_mtp_layers=2))
    path = sobre.save(model, tmp_path / "m")
    out = run("generate", str(path), "--ids", "5,6,7", "--max-new-tokens", "8")
    ids = [int(t) for t in out.stdout.split()]
    assert ids == list(sobre.generate(model, [5, 6, 7], max_new_tokens=8, stop=(1,)))
    assert "tok/s" in out.stderr and "MTP" not in out.stderr
    run_dir = tmp_path / "run"  # a sobre run folder (its own config.json): the model it exported, model/
    sobre.save(model, run_dir / "model")
    (run_dir / "config.json").write_text(json.dumps({"sft": {"steps": 1}, "model": {}}))
    code, stdout, _ = call(capsys, "generate", str(run_dir), "--ids", "5,6,7", "--max-new-tokens", "8")
    assert code == 0 and [int(t) for t in stdout.split()] == ids
    code, stdout, _ = call(capsys, "info", str(run_dir))
    assert code == 0 and stdout.startswith("deepseek_v3: 3 layers (+2 MTP)")
    # MTP drafts: one per MTP layer (2), or 1; never stopping; over the first 16 ids
    for k in ([], ["1"], ["--min-acceptance", "0"], ["--draft-vocab", "16"]):
        code, stdout, stderr = call(capsys, "generate", str(path), "--ids", "5,6,7", "--max-new-tokens", "8",
                                    "--speculative", *k)
        assert code == 0 and [int(t) for t in stdout.split()] == ids
        assert re.search(r"MTP speculative: \d+ of \d+ drafts accepted \(\d+%\), [\d.]+ tokens a verify", stderr)
    code, _, stderr = call(capsys, "generate", str(path), "--ids", "5,6,7", "--speculative", "3")
    assert code == 1 and "drafts 1..2 tokens a step" in stderr
    code, _, stderr = call(capsys, "generate", str(path), "--ids", "5,6,7", "--speculative", "--min-acceptance", "2")
    assert code == 1 and "min_acceptance must be in [0, 1]" in stderr
    code, _, stderr = call(capsys, "generate", str(path), "--ids", "5,6,7", "--speculative", "--draft-vocab", "0")
    assert code == 1 and "draft_vocab must be >= 1" in stderr


def test_generate_with_tokenizer_text_prompt(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.train_from_iterator(["hello world", '{"a": [1, 2], "b": true}'] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = sobre.save(random_model(sobre.preset("debug", vocab_size=tok.get_vocab_size())), tmp_path / "m")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out = run("generate", str(path), "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0.8",
              "--seed", "3")
    assert out.returncode == 0 and "tokens in" in out.stderr, out.stderr
    code, stdout, _ = call(capsys, "generate", str(path), "--prompt", "hello", "--max-new-tokens", "12", "--json")
    assert code == 0 and JsonPrefix().feed(stdout) and stdout.lstrip().startswith("{"), stdout  # JSON mode
    schema = {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code, stdout, _ = call(capsys, "generate", str(path), "--prompt", "hello", "--max-new-tokens", "12",
                           "--json-schema", str(tmp_path / "s.json"))  # {"b": true} or false, or a prefix of one
    assert code == 0 and SchemaPrefix(schema).feed(stdout) and stdout.lstrip().startswith("{"), stdout
    code, _, stderr = call(capsys, "generate", str(path), "--prompt", "hello", "--json-schema",
                           str(tmp_path / "none.json"))
    assert code == 1 and "--json-schema" in stderr and "No such file" in stderr
    (tmp_path / "array.json").write_text(json.dumps({"type": "array"}))
    code, _, stderr = call(capsys, "generate", str(path), "--prompt", "hello", "--json-schema",
                           str(tmp_path / "array.json"))
    assert code == 1 and "the top level must be" in stderr


def test_generate_fills_in_the_middle(tmp_path, capsys):
    """--suffix: the model continues the PSM prompt (Tokenizer.fim_prompt), greedy as the Python API; without the
    FIM tokens in the vocabulary, or with --ids, a clear error."""
    from sobre.tokenizer import train_tokenizer
    path = tmp_path / "m"
    tok = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 50, 300, path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size))
    sobre.save(model, path)
    want = sobre.generate(model, tok.fim_prompt("def add(a, b):", "\n"), max_new_tokens=6, stop=(tok.eos_id,))
    code, stdout, stderr = call(capsys, "generate", str(path), "--prompt", "def add(a, b):", "--suffix", "\n",
                                "--max-new-tokens", "6")
    assert code == 0 and stdout == tok.decode([t for t in want if t != tok.eos_id])  # (its end flushed)
    code, _, stderr = call(capsys, "generate", str(path), "--ids", "5,6", "--suffix", "x")
    assert code == 1 and "--suffix (fill in the middle) needs a text --prompt" in stderr


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    out = run("info", str(tmp_path / "nope"), check=False)
    assert out.returncode != 0 and "error:" in out.stderr and "Traceback" not in out.stderr
    path = sobre.save(random_model(), tmp_path / "m")  # (in this process: any other exception fails the test)
    code, _, stderr = call(capsys, "generate", str(path), "--prompt", "hi")
    assert code == 1 and "no tokenizer.json" in stderr
    code, _, stderr = call(capsys, "convert", str(path), str(tmp_path / "." / "m"))
    assert code == 1 and "is the source checkpoint" in stderr  # (it had rewritten the source in place)
    for verb in (("generate", str(path), "--ids", "1"), ("sft", "--task", "arithmetic", "--out", str(tmp_path / "s"))):
        code, _, stderr = call(capsys, *verb, "--device", "gpu0")  # a device name torch does not know, before any work
        assert code != 0 and "--device 'gpu0' is not a device name" in stderr, stderr
        assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, says", [
    (["serve", "m", "--port", "99999"], "argument --port: a TCP port is 0..65535, got 99999"),
    (["serve", "m", "--max-batch", "0"], "argument --max-batch: must be >= 1, got 0"),
    (["serve", "m", "--timeout", "0"], "argument --timeout: must be > 0, got 0"),
    (["eval", "m", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["rejection-sample", "m", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["speedrun", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["speedrun", "--minutes", "-5"], "argument --minutes: must be > 0, got -5"),
    (["generate", "m", "--ids", "1,2,x"], "argument --ids: expected comma-separated token ids like 1,2,3, got '1,2,x'"),
    (["generate", "m", "--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    (["generate", "m", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 1, got -3"),
    (["chat", "m", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["info", "m", "--ctx", "two"], "argument --ctx: invalid integer value: 'two'"),
])
def test_out_of_range_flags_are_usage_errors(argv, says, capsys):
    """A count, port or budget out of its range stops at the command line, one line naming the flag, before any
    model loads (it had divided by zero, bound no port after loading, or run a whole speedrun on --steps 0)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_sampling_parameters_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        list(sobre.generate(random_model(), [1, 2], temperature=1.0, top_p=0.0))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got -3"):  # (it had named the cache size)
        list(sobre.generate(random_model(), [1, 2], max_new_tokens=-3))
    a = list(sobre.generate(random_model(), [1, 2], max_new_tokens=6, temperature=1.0, seed=7))
    b = list(sobre.generate(random_model(), [1, 2], max_new_tokens=6, temperature=1.0, seed=7))
    assert a == b


def test_speedrun_runs_every_stage_and_resumes(tmp_path):
    args = ("speedrun", "--out", str(tmp_path / "run"), "--preset", "debug", "--steps", "6", "--eval-problems", "4",
            "--device", "cpu", "--nproc", "2",  # the training stages in 2 torchrun (gloo) processes
            "--precision", "fp32")  # (bf16 autocast: each trainer's own tests; on a CPU that emulates it, +40 s here)
    out = run(*args)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "greedy tokens equal: True" in report, out.stdout
    assert "cpu, training in 2 processes, fp32" in report
    for run_dir in ("pretrain", "sft", "grpo", "distill/student", "distill/baseline"):
        assert json.loads((tmp_path / "run" / run_dir / "config.json").read_text())["world"] == 2, run_dir
    assert "stage 1/5 pretrain" in out.stdout and "stage 5/5 eval (elapsed" in out.stdout and "min to go" in out.stdout
    stages = {s: json.loads((tmp_path / "run" / s / "stage.json").read_text())
              for s in ("pretrain", "sft", "grpo", "distill", "eval")}
    p = stages["pretrain"]
    assert p["final_loss"] < p["first_loss"] and p["transformers"]["logits_max_diff"] < 1e-4 * max(
        1.0, p["transformers"]["logit_scale"])
    assert stages["sft"]["final_loss"] < stages["sft"]["first_loss"]
    assert all(len(v[t]["solved"]) == v[t]["problems"] for v in stages["eval"].values() if isinstance(v, dict)
               for t in ("arithmetic:1", "sorting:1", "sampled") if t in v)  # per problem: the paired sign tests
    sampled = {m: v["sampled"] for m, v in stages["eval"].items() if isinstance(v, dict) and "sampled" in v}
    assert set(sampled) == {"sft", "grpo", "distill", "distill_baseline"}  # R1's pass@1 (the pretrained: greedy only)
    assert all((r["samples"], r["temperature"], r["top_p"], r["problems"]) == (8, 0.6, 0.95, 4)
               for r in sampled.values())
    for pair in ("grpo vs sft", "student (distilled) vs student (no teacher)"):
        assert f"- {pair}, greedy:" in report and f"- {pair}, R1's pass@1:" in report
    assert "held-out pass@1 (R1: 8 samples a problem) every" in report  # GRPO's curve
    summary = json.loads((tmp_path / "run" / "report.json").read_text())  # the CLI contract
    assert set(summary["eval"]) == {"pretrain", "sft", "grpo", "distill", "distill_baseline"}
    assert all(set(v) == {"arithmetic:1", "arithmetic:2", "sorting:1"} | ({"r1_pass@1"} if m != "pretrain" else set())
               and all(0 <= x <= 1 for x in v.values()) for m, v in summary["eval"].items())
    assert set(summary["stages"]) == {"pretrain", "sft", "grpo", "distill"} and summary["wall_time_s"] > 0
    assert run("report", str(tmp_path / "run")).stdout.strip() == report.strip()
    assert run("verify", str(tmp_path / "run" / "grpo" / "model")).returncode == 0
    for f in ("pretrain/loss.png", "sft/loss.png", "grpo/reward.png", "distill/student/model/config.json"):
        assert (tmp_path / "run" / f).exists(), f
    again = run(*args)  # finished stages are skipped
    assert again.stdout.count("already done") == 5


def test_verify_reports_changed_missing_and_added_files(tmp_path):
    path = sobre.save(random_model(), tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    assert manifest["config"]["model_type"] and "command" in manifest and "git_commit" in manifest
    assert run("verify", str(path)).returncode == 0
    with open(path / "model.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    (path / "README.md").unlink()
    (path / "extra.bin").write_bytes(b"x")
    out = run("verify", str(path), check=False)
    assert out.returncode == 1
    assert "changed: model.safetensors" in out.stdout and "missing: README.md" in out.stdout
    assert "added: extra.bin" in out.stdout
    out = run("verify", str(tmp_path), check=False)
    assert out.returncode != 0 and "no manifest.json" in out.stderr
