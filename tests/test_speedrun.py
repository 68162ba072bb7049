"""The speedrun's size: the default recipe where the machine runs it within the budget, cut where the result
loses least where it cannot, replanned from the pace the finished stages showed (the end-to-end run itself is
tests/test_cli.py's; here the stages are stand-ins that take the time the cost model gives them)."""

import json

import pytest
import torch

from sobre import speedrun as sr


def test_fit_plan_keeps_the_recipe_when_it_fits_and_cuts_in_order():
    full = sr.cost(sr.RECIPE)
    assert sr.fit_plan(sr.RECIPE, full) == sr.RECIPE
    assert sr.fit_plan(sr.RECIPE, full - 100) == dict(sr.RECIPE, pretrain=200)  # pretraining first
    plan = sr.fit_plan(sr.RECIPE, full - 200 - 5 * sr.STEP_COST["grpo"] + 0.5)  # pretraining at its floor, then GRPO
    assert plan["pretrain"] == sr.CUTS["pretrain"] and plan["grpo"] == sr.RECIPE["grpo"] - 5
    assert {k: plan[k] for k in ("sft", "student", "baseline")} == {k: sr.RECIPE[k] for k in ("sft", "student",
                                                                                             "baseline")}
    cut = sr.cost(dict(sr.RECIPE, pretrain=100, grpo=20, baseline=0))
    plan = sr.fit_plan(sr.RECIPE, cut)  # then the no-teacher student goes, whole
    assert plan == dict(sr.RECIPE, pretrain=100, grpo=20, baseline=0)
    plan = sr.fit_plan(sr.RECIPE, cut + 10 * sr.STEP_COST["grpo"])  # what it frees goes back to GRPO first
    assert plan == dict(sr.RECIPE, pretrain=100, grpo=30, baseline=0)
    plan = sr.fit_plan(sr.RECIPE, cut + 20 * sr.STEP_COST["grpo"] + 50)  # then to pretraining
    assert plan == dict(sr.RECIPE, pretrain=150, grpo=40, baseline=0)
    for room in (cut, cut - 300, 300, 100):
        plan = sr.fit_plan(sr.RECIPE, room)
        assert sr.cost(plan) <= room or all(n <= 1 for n in plan.values())
        if plan["sft"] < sr.RECIPE["sft"]:  # SFT and the student shrink last, in proportion
            assert plan["baseline"] == 0 and plan["grpo"] <= sr.CUTS["grpo"]
            assert plan["sft"] / sr.RECIPE["sft"] == pytest.approx(plan["student"] / sr.RECIPE["student"], abs=0.01)


class Clock:  # stands in for the time module: the stages advance it
    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t


def fake_stages(monkeypatch, clock: Clock, timed: float, real: float, bf16_timed: float | None = None) -> dict:
    """Stages that take `real` seconds per pretraining step of cost; a pretraining step times at `timed` (in bf16:
    `bf16_timed`, default the same); got["where"] / got["bf16"]: each stage's device and process count / bf16."""
    got = {}

    def work(d, parts: dict):  # parts {}: the evaluation
        d.mkdir(parents=True, exist_ok=True)
        got.update(parts)
        clock.t += (sr.cost(parts) if not parts else sr.cost(parts) - sr.FIXED_COST["eval"]) * real
        return d

    def on(stage, device, nproc=1, bf16=False):
        got.setdefault("where", {})[stage] = (device, nproc)
        got.setdefault("bf16", {})[stage] = bf16

    monkeypatch.setattr(sr, "time", clock)
    monkeypatch.setattr(sr, "pretrain_step_seconds", lambda preset_name, device, bf16=False:
                        bf16_timed if bf16 and bf16_timed is not None else timed)
    monkeypatch.setattr(sr, "_pretrain", lambda d, p, seed, steps, device, nproc, bf16:
                        on("pretrain", device, nproc, bf16) or {"steps": work(d, {"pretrain": steps}) and steps})
    monkeypatch.setattr(sr, "sft", lambda a: on("sft", a.device, 1, a.bf16) or work(sr.Path(a.out), {"sft": a.steps}))
    monkeypatch.setattr(sr, "grpo", lambda a: on("grpo", a.device, 1, a.bf16) or work(sr.Path(a.out),
                                                                                   {"grpo": a.steps}))
    monkeypatch.setattr(sr, "_finished", lambda run, n: {})
    monkeypatch.setattr(sr, "_grpo_summary", lambda run, n: {})
    monkeypatch.setattr(sr, "_torchrun", lambda verb, a, nproc: on(verb, a.device, nproc, a.bf16) or
                        work(sr.Path(a.out), {verb: a.steps}))
    monkeypatch.setattr(sr, "_distill", lambda d, out, p, student, baseline, seed, device, bf16, nproc:
                        on("distill", device, nproc, bf16) or {"dir": str(work(d, {"student": student,
                                                                                   "baseline": baseline}))})
    monkeypatch.setattr(sr, "_evaluate", lambda d, out, n, seed, device: on("eval", device) or work(d, {}) and {})
    monkeypatch.setattr(sr, "report", lambda out: "")
    return got


def total_minutes(out) -> float:
    return sum(json.loads((out / s / "stage.json").read_text())["minutes"] for s in sr.STAGES)


def test_a_fast_machine_runs_the_recipe(tmp_path, monkeypatch):
    clock = Clock()
    got = fake_stages(monkeypatch, clock, timed=0.6, real=0.6)
    r = sr.speedrun(tmp_path / "run", minutes=30)
    got.pop("where"), got.pop("bf16")
    assert r["plan"] == sr.RECIPE and got == sr.RECIPE
    assert total_minutes(tmp_path / "run") <= 30


def test_a_slower_machine_than_timed_gets_its_later_stages_cut_and_fits(tmp_path, monkeypatch):
    clock, out = Clock(), tmp_path / "run"
    got = fake_stages(monkeypatch, clock, timed=1.0, real=1.25)
    r = sr.speedrun(out, minutes=30)
    got.pop("where"), got.pop("bf16")
    assert got == r["plan"] and json.loads((out / "speedrun.json").read_text())["plan"] == r["plan"]
    # planned on the timed step: pretraining cut, the baseline out, the time it freed back to GRPO and pretraining
    assert sr.CUTS["pretrain"] < r["plan"]["pretrain"] < sr.RECIPE["pretrain"] and r["plan"]["baseline"] == 0
    # pretraining's pace showed the rest would not fit: GRPO at its floor, SFT and the student shrink
    assert r["plan"]["grpo"] <= sr.CUTS["grpo"] and r["plan"]["sft"] < sr.RECIPE["sft"]
    assert 28 <= total_minutes(out) <= 30
    # an interrupted run: SFT had started (its folder exists), the rest had not; this time the machine is fast
    for s in sr.STAGES[1:]:
        (out / s / "stage.json").unlink()
    for s in sr.STAGES[2:]:
        sr.shutil.rmtree(out / s)
    got.clear()
    monkeypatch.setattr(sr, "_spent", lambda o, done: 0.6 * len(done))  # the finished pretraining looks quick now
    r2 = sr.speedrun(out, minutes=30)
    assert got["sft"] == r["plan"]["sft"]  # a started stage keeps its size (its checkpoints, its lr schedule)
    assert got["grpo"] == sr.RECIPE["grpo"] and got["baseline"] == sr.RECIPE["baseline"] == r2["plan"]["baseline"]


def test_steps_sets_the_size_without_timing(tmp_path, monkeypatch):
    clock = Clock()
    got = fake_stages(monkeypatch, clock, timed=float("nan"), real=1.0)
    sr.speedrun(tmp_path / "run", steps=12, device="cpu", nproc=2)
    assert got.pop("where") == {"pretrain": ("cpu", 2), "sft": ("cpu", 2), "grpo": ("cpu", 2), "distill": ("cpu", 2),
                                "eval": ("cpu", 1)}  # every stage on --device; the training stages in --nproc processes
    assert not any(got.pop("bf16").values())  # (auto still times the precision: nan here, so fp32)
    assert got == sr.scaled_plan(12) == {"pretrain": 12, "sft": 18, "grpo": 2, "student": 18, "baseline": 18}
    assert sr.scaled_plan(300) == sr.RECIPE  # --steps 300: the default run, never cut
    assert json.loads((tmp_path / "run" / "speedrun.json").read_text())["nproc"] == 2


def test_auto_precision_trains_in_bf16_where_it_times_faster_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    clock, out = Clock(), tmp_path / "run"
    got = fake_stages(monkeypatch, clock, timed=1.0, real=0.6, bf16_timed=1.0 / sr.BF16_GAIN)
    monkeypatch.setattr(sr, "native_bf16", lambda: True)  # (a CPU with AVX512-BF16 or AMX)
    r = sr.speedrun(out, minutes=30)
    assert r["bf16"] and r["step_seconds"] == {"fp32": 1.0, "bf16": 1.0 / sr.BF16_GAIN}
    assert got["bf16"] == {s: True for s in sr.STAGES if s != "eval"} | {"eval": False}  # every training stage
    got.clear()
    monkeypatch.setattr(sr, "pretrain_step_seconds", None)  # a resumed run is not timed again: it keeps bf16
    (out / "distill" / "stage.json").unlink()
    assert sr.speedrun(out, minutes=30)["bf16"] and got["bf16"] == {"distill": True, "eval": False}
    with pytest.raises(ValueError, match="started in bf16.*--force"):
        sr.speedrun(out, minutes=30, precision="fp32")
    got = fake_stages(monkeypatch, clock, timed=1.0, real=0.6, bf16_timed=1.0 / sr.BF16_GAIN * 1.01)
    assert not sr.speedrun(out, minutes=30, force=True)["bf16"]  # not 1.2x faster: fp32
    assert not any(got["bf16"].values())
    got = fake_stages(monkeypatch, clock, timed=float("nan"), real=0.6)
    r = sr.speedrun(tmp_path / "fixed", steps=4, precision="bf16")  # chosen, not timed
    assert r["bf16"] and r["step_seconds"] == {} and got["bf16"]["sft"]
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        sr.speedrun(tmp_path / "bad", steps=2, precision="fp16")


def test_bad_device_or_process_count_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a device name"):
        sr.speedrun(tmp_path / "a", steps=2, device="gpu0")
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        sr.speedrun(tmp_path / "b", steps=2, device="cpu", nproc=0)
    for kw, says in (({"steps": 0}, "--steps must be >= 1, got 0"), ({"minutes": 0}, "--minutes must be > 0"),
                     ({"steps": 2, "eval_problems": 0}, "--eval-problems must be >= 1")):
        with pytest.raises(ValueError, match=says):
            sr.speedrun(tmp_path / "b", device="cpu", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            sr.speedrun(tmp_path / "c", steps=2, device="cuda")
    assert sr.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_auto_precision_does_not_time_bf16_on_a_cpu_that_emulates_it(tmp_path, monkeypatch):
    timed = []
    got = fake_stages(monkeypatch, Clock(), timed=1.0, real=0.6)
    monkeypatch.setattr(sr, "pretrain_step_seconds", lambda preset_name, device, bf16=False:
                        timed.append(bf16) or (0.1 if bf16 else 1.0))  # (bf16 would look 10x faster)
    monkeypatch.setattr(sr, "native_bf16", lambda: False)
    r = sr.speedrun(tmp_path / "run", minutes=30, device="cpu")
    assert timed == [False] and not r["bf16"] and r["step_seconds"] == {"fp32": 1.0}
    assert not any(got["bf16"].values())
    assert "no native bf16" in sr.precision_note(r["step_seconds"])
