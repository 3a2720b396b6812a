"""--policy=auto: the pick is the fastest policy whose numerics pass, shown as a table, kept in
run.json for a resume, and the chief's on every worker."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli, small_config, user_stderr_lines
from trainer import job
from trainer.compat import keras
from trainer.config import ConfigError
from trainer.core.steps import Trainer
from trainer.errors import UserError
from trainer.runtime import devices, lockstep
from trainer.runtime.lockstep import Lockstep
from trainer.tools import auto_policy
from trainer.tools.auto_policy import Candidate, Decision, PolicyTrial, choose

CPU = devices.DeviceInfo("cpu", "/device:CPU:0", "a test CPU", fast_bf16=True, fast_fp16=True)


def _measured(policy: str, ms: float, numerics: str = "OK") -> Candidate:
    """A candidate timed at ``ms`` per step (three calls of 10 steps around that median)."""
    return Candidate(policy, numerics="reference" if policy == "float32" else numerics,
                     seconds=[ms / 100, ms / 100 * 1.5, ms / 100 * 0.9], steps_per_call=10)


# ---------------------------------------------------------------------- the rule, pure


@pytest.mark.parametrize("f32,bf16,fp16", list(itertools.product((1.0, 2.0, 3.0), repeat=3)))
@pytest.mark.parametrize("bf16_verdict,fp16_verdict",
                         [("OK", "OK"), ("OK", "FLAGGED"), ("FLAGGED", "OK"),
                          ("FLAGGED", "FLAGGED")])
def test_the_pick_is_the_fastest_of_the_passing_policies(f32, bf16, fp16, bf16_verdict,
                                                         fp16_verdict):
    candidates = [_measured("float32", f32), _measured("mixed_bfloat16", bf16, bf16_verdict),
                  _measured("mixed_float16", fp16, fp16_verdict)]
    times = {"float32": f32, "mixed_bfloat16": bf16, "mixed_float16": fp16}
    passing = ["float32"] + [p for p, v in (("mixed_bfloat16", bf16_verdict),
                                            ("mixed_float16", fp16_verdict)) if v == "OK"]
    chosen = choose(candidates)
    assert chosen in passing  # Never a flagged policy, however fast.
    assert times[chosen] == min(times[p] for p in passing)  # The argmin of the passing ones.
    # On a tie the earlier candidate: a 16-bit policy must be strictly faster than float32.
    assert chosen == next(p for p in passing if times[p] == min(times[q] for q in passing))
    assert candidates[1].ms_per_step == pytest.approx(bf16)  # The median call, per step.


def test_policies_not_tried_or_not_timed_are_never_picked():
    skipped = Candidate("mixed_float16", skipped="not tried: no fast float16 math")
    untimed = Candidate("mixed_bfloat16", numerics="OK")
    assert choose([_measured("float32", 5.0), untimed, skipped]) == "float32"
    with pytest.raises(ValueError, match="no policy of the trial passed"):
        choose([skipped, untimed])


def test_on_a_cpu_without_bf16_instructions_the_table_says_why_float32_won(monkeypatch):
    # The CPU detection as a run sees it, forced to a CPU without AMX or AVX512-BF16.
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    cpu = devices.select_device("cpu", policy="float32")
    assert not cpu.fast_bf16
    candidates = auto_policy.candidates_for(cpu)
    assert [c.policy for c in candidates if not c.skipped] == ["float32", "mixed_bfloat16"]
    timed = {"float32": 4.0, "mixed_bfloat16": 6.4}
    candidates = [_measured(c.policy, timed[c.policy]) if c.policy in timed else c
                  for c in candidates]
    decision = Decision(policy=choose(candidates), candidates=candidates, device=cpu,
                        trial_seconds=9.5, budget_seconds=15.0, rounds=7)
    text = auto_policy.format_decision(decision)
    lines = text.splitlines()
    assert lines[0].startswith("policy auto: 2 policies tried on ")
    assert lines[0].endswith("7 rounds of 10 steps each: trial 9.5 s (budget 15 s)")
    rows = {line.split()[0]: line for line in lines[3:6]}
    assert re.fullmatch(r"float32 +4\.00 +1\.00x +reference +yes +fastest of those that pass",
                        rows["float32"])
    assert re.fullmatch(r"mixed_bfloat16 +6\.40 +0\.62x +OK +1\.60x the time of float32: this "
                        r"CPU has no AMX or AVX512-BF16, so bf16 is emulated",
                        rows["mixed_bfloat16"])
    assert "not tried: this CPU has no AVX512-FP16" in rows["mixed_float16"]
    assert lines[-1] == "policy auto: training float32"


# ---------------------------------------------------------------------- the trial, for real


def overflowing_model(input_shape, num_classes):
    """Activations near 1.6e5 after the first layer: past float16's 65504, fine in bf16."""
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(),
        keras.layers.Dense(8, kernel_initializer=keras.initializers.Constant(400.0),
                           name="big"),
        keras.layers.Dense(num_classes, name="logits"),
        keras.layers.Activation("softmax", dtype="float32", name="predictions")])


class Overflowing(Trainer):
    def build_model(self):
        return overflowing_model(self.datasets.input_shape, self.datasets.num_classes)


class FakeTimes(PolicyTrial):
    """The real trial (models, inspector, warm-up steps) with float16 timed fastest."""

    TIMES = {"float32": 0.03, "mixed_bfloat16": 0.02, "mixed_float16": 0.01}

    def time_call(self, trainer):
        return self.TIMES[trainer.config.policy]


def _all_three():
    return [Candidate(p) for p in ("float32", "mixed_bfloat16", "mixed_float16")]


def test_a_model_that_overflows_in_float16_never_gets_it_even_when_fastest():
    config = small_config(policy="auto")
    decision = FakeTimes(config, device=CPU, trainer_cls=Overflowing, candidates=_all_three(),
                         min_budget_s=1.0).run()
    rows = {row["policy"]: row for row in decision.rows()}
    assert rows["mixed_float16"]["numerics"] == "FLAGGED"
    assert rows["mixed_float16"]["why"].startswith("fastest, but numerics flagged 'big'")
    assert rows["mixed_float16"]["ms_per_step"] == pytest.approx(2.5)  # 10 ms, 4 steps a call.
    assert rows["mixed_bfloat16"]["numerics"] == "OK"  # bf16 has float32's range.
    assert decision.policy == "mixed_bfloat16"
    # The control: the same trial on the seed model, which float16 holds, picks float16.
    control = FakeTimes(config, device=CPU, candidates=_all_three(), min_budget_s=1.0).run()
    assert [c.numerics for c in control.candidates] == ["reference", "OK", "OK"]
    assert control.policy == "mixed_float16"


def test_a_candidate_whose_trial_diverges_is_shown_and_never_chosen():
    # float16 overflows at every step: two skips in a row stop its step loop (the storm
    # check), during the untimed first call, so its first timed call runs no step at all.
    config = small_config(policy="auto", max_consecutive_skips=2, loss_scale=1.0)
    decision = PolicyTrial(config, device=CPU, trainer_cls=Overflowing,
                           candidates=_all_three(), min_budget_s=1.0).run()
    rows = {row["policy"]: row for row in decision.rows()}
    assert rows["mixed_float16"]["ms_per_step"] is None  # Calls of 0 steps are no speed.
    assert rows["mixed_float16"]["why"] == (
        "diverged in the trial: stopped at step 2 with 2 non-finite steps skipped: never "
        "chosen")
    assert rows["float32"]["ms_per_step"] and rows["mixed_bfloat16"]["ms_per_step"]
    assert decision.policy in ("float32", "mixed_bfloat16")


def test_the_trial_stops_within_its_budget_and_says_what_it_cost():
    ticks = itertools.count()

    class SlowCalls(PolicyTrial):
        # Equal times: the decision never becomes clear, so only the budget stops it.
        def time_call(self, trainer):
            del trainer
            return 1.0

    trial = SlowCalls(small_config(policy="auto"), device=CPU, min_budget_s=20.0,
                      candidates=[Candidate("float32"), Candidate("mixed_bfloat16")],
                      clock=lambda: float(next(ticks)))
    decision = trial.run()
    # Each clock reading is one second later, so a round takes two: the tenth ends at 20 s,
    # and an eleventh would end after the budget.
    assert decision.rounds == 10
    assert decision.budget_seconds == 20.0 and decision.trial_seconds == 21.0
    assert decision.policy == "float32"  # A tie keeps float32.


# ---------------------------------------------------------------------- settings, lockstep


def test_auto_settings_are_checked():
    with pytest.raises(ConfigError, match=r"dry_run shows the decision of --policy=auto"):
        small_config(dry_run=True)
    for tool in ("audit", "numerics"):
        with pytest.raises(ConfigError, match=rf"--{tool} inspects one policy"):
            small_config(policy="auto", **{tool: True})
    with pytest.raises(UserError, match="policy 'auto' is not a dtype policy"):
        Trainer(small_config(policy="auto"))


def test_the_chiefs_trial_is_not_part_of_the_job_sequence():
    steps = Lockstep()
    lockstep.collective("before")
    before = (lockstep._SEQUENCE.count, lockstep._SEQUENCE.digest)
    with steps.chief_alone() as chief:
        assert chief
        lockstep.collective("train steps")
    assert (lockstep._SEQUENCE.count, lockstep._SEQUENCE.digest) == before
    assert steps.broadcast_from_chief(2, name="auto policy") == 2
    assert lockstep._SEQUENCE.count == before[0] + 1  # The broadcast is one collective.


def test_auto_on_a_resume_keeps_the_policy_run_json_records_even_an_explicit_one(tmp_path,
                                                                                capsys):
    model_dir = str(tmp_path / "run")
    job.run(small_config(policy="float32", model_dir=model_dir))
    # No trial: the checkpoints were trained in float32, and a resume keeps their policy.
    summary = job.run(small_config(policy="auto", model_dir=model_dir, epochs=2, verbose=True))
    out = capsys.readouterr().out
    assert f"policy auto: float32, kept from {model_dir}/run.json (no new trial)" in out
    assert "tried on" not in out
    assert summary["policy"] == "float32" and summary["global_step"] == 16
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["policy"] == "float32" and saved["policy_auto"] == {"policy": "float32"}
    # A resume under another explicit policy is a policy change, refused as before.
    with pytest.raises(UserError, match=r"its policy is 'float32', this run's is "
                       r"'mixed_bfloat16'.*--allow_policy_change"):
        job.run(small_config(policy="mixed_bfloat16", model_dir=model_dir, epochs=3))


# ---------------------------------------------------------------------- end to end


def test_auto_trains_the_choice_keeps_it_in_run_json_and_a_resume_runs_no_trial(tmp_path):
    model_dir = tmp_path / "run"
    args = ("--policy=auto", "--dataset=synthetic", "--synthetic_examples=512",
            "--batch_size=64", f"--model_dir={model_dir}", "--device=cpu")
    first = run_cli(*args, "--epochs=1", f"--metrics_file={tmp_path / 'm1.json'}")
    assert first.returncode == 0, first.stderr[-3000:]
    chosen = re.search(r"^policy auto: training (\S+)$", first.stdout, re.M).group(1)
    assert re.search(r"^policy auto: \d policies tried on .*: trial [\d.]+ s \(budget \d+ s\)$",
                     first.stdout, re.M)
    assert re.search(rf"^{chosen} .* yes ", first.stdout, re.M)  # The table marks it.
    assert f"policy: {chosen} | " in first.stdout  # The banner: what trains.
    saved = json.loads((model_dir / "run.json").read_text())
    assert saved["policy"] == saved["policy_auto"]["policy"] == chosen
    assert [r["policy"] for r in saved["policy_auto"]["rows"] if r["chosen"]] == [chosen]
    assert json.loads((tmp_path / "m1.json").read_text())["policy"] == chosen

    again = run_cli(*args, "--epochs=2", f"--metrics_file={tmp_path / 'm2.json'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"policy auto: {chosen}, kept from {model_dir / 'run.json'} (no new trial)" \
        in again.stdout
    assert "tried on" not in again.stdout and "resuming from" in again.stdout
    metrics = json.loads((tmp_path / "m2.json").read_text())
    assert metrics["policy"] == chosen and metrics["global_step"] == 14  # 7 steps an epoch.
    assert json.loads((model_dir / "run.json").read_text()) == saved  # Unchanged by a resume.
    assert user_stderr_lines(again.stderr) == []


def test_dry_run_prints_the_table_and_trains_nothing(tmp_path):
    proc = run_cli("--policy=auto", "--dry_run", "--dataset=synthetic",
                   "--synthetic_examples=512", "--batch_size=64", "--device=cpu",
                   f"--model_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^policy auto: would train \S+ \(--dry_run: nothing trained\)$",
                     proc.stdout, re.M)
    assert "test: loss" not in proc.stdout and not (tmp_path / "run").exists()


WORKER_LINE = re.compile(r"worker (\d)/2[^:]*: global_step (\d+) "
                         r"weights_checksum (-?\d+\.\d+(?:e[-+]?\d+)?)")


def test_two_workers_train_the_chiefs_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", "run.py",
         "--policy=auto", "--distribution=multi_worker", "--dataset=synthetic",
         "--synthetic_examples=512", "--batch_size=32", "--model_args=units=16", "--epochs=1",
         "--steps_per_loop=4", f"--model_dir={tmp_path / 'run'}", "--device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # One trial, on the chief; its choice trains on both workers, which stay in step.
    assert output.count(" policies tried on ") == 1, output[-3000:]
    (chosen,) = re.findall(r"policy auto: training (\S+)", output)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["policy"] == chosen
    workers = {int(i): (int(step), checksum) for i, step, checksum in WORKER_LINE.findall(output)}
    assert sorted(workers) == [0, 1] and workers[0] == workers[1], output[-3000:]
    assert workers[0][0] == 14
