"""Recovery from divergence (--recover_trials, --loss_upper_bound): restore the last checkpoint
and go on, the same on every input path, and one ``error:`` line when recovery is off or spent.

The blow-ups are injected in the compiled step, at chosen global steps, and only while a
counter kept *outside* the checkpoint lasts: like a transient fault (a bad host, a flipped
bit), the first pass through those steps blows up and the replay after the restore does not.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, run_cli, small_config, user_stderr_lines
from trainer import job
from trainer.compat import tf
from trainer.config import ConfigError
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped
from trainer.loop import fit_loop

STEPS_PER_EPOCH = 16  # 512 synthetic examples, batch 32.


def _config(model_dir, **overrides):
    settings = dict(policy="float32", synthetic_examples=512, epochs=2, checkpoint_every=4,
                    max_consecutive_skips=3, deterministic=True, model_dir=str(model_dir),
                    optimizer="adam", learning_rate=0.01)
    settings.update(overrides)
    return small_config(**settings)


def faulty(base=Trainer, *, at: int, steps: int, factor: float = float("nan"), inputs="in_graph"):
    """A Trainer class whose loss is multiplied by ``factor`` for ``steps`` steps from global
    step ``at``, once: the counter of faults left is no checkpointed state."""

    class Faulty(base):
        def __init__(self, config, **kwargs):
            self.faults_left = tf.Variable(steps, dtype=tf.int64, trainable=False)
            super().__init__(config, **kwargs)

        def build_datasets(self):
            datasets = super().build_datasets()
            if inputs == "tf.data":  # A mapped stream is read through tf.data and train_from.
                return datasets.map_train(lambda x, y: (x, y))
            if inputs == "saved iterator":  # No train_from: the iterator is checkpointed.
                return dataclasses.replace(datasets, train_from=None)
            return datasets

        def compute_loss(self, labels, outputs):
            loss = super().compute_loss(labels, outputs)
            hit = tf.logical_and(self.global_step >= at, self.faults_left > 0)
            with tf.control_dependencies([self.faults_left.assign_sub(tf.cast(hit, tf.int64))]):
                return loss * tf.where(hit, tf.constant(factor, loss.dtype), 1.0)

    return Faulty


@pytest.mark.parametrize("inputs", ["in_graph", "tf.data", "saved iterator"])
def test_a_recovered_run_is_the_run_that_never_diverged(tmp_path, inputs, capsys):
    # NaN at global steps 9, 10, 11: with 3 skips allowed in a row the storm ends the run
    # after the step loop that ends at step 12 (before its checkpoint); the newest is step 8.
    recovered = job.run(_config(tmp_path / "a", recover_trials=1),
                        trainer_cls=faulty(at=9, steps=3, inputs=inputs))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    clean = job.run(_config(tmp_path / "b"), trainer_cls=faulty(at=9, steps=0, inputs=inputs))
    assert warnings == [
        f"warning: step 12: the last 3 steps in a row had non-finite gradients and were skipped "
        f"(--max_consecutive_skips=3); restored {tmp_path / 'a' / 'checkpoints' / 'ckpt-8'} "
        "(step 8) and going on, recovery 1 of 1 (--recover_trials)"]
    assert recovered["global_step"] == clean["global_step"] == 2 * STEPS_PER_EPOCH
    # The skips of the abandoned steps went with them: the checkpoint at step 8 had none.
    assert recovered["skipped_steps"] == clean["skipped_steps"] == 0
    assert recovered["recoveries"] == 1 and clean["recoveries"] == 0
    # The same batches from step 8 on, the same optimizer state: bit for bit the clean run.
    assert recovered["weights_checksum"] == clean["weights_checksum"]
    assert [row["loss"] for row in recovered["history"]] == \
        [row["loss"] for row in clean["history"]]
    assert [row["step"] for row in recovered["history"]] == [16, 32]


def test_without_recovery_the_same_blow_up_stops_at_the_storm(tmp_path):
    with pytest.raises(TrainingStopped) as info:
        job.run(_config(tmp_path / "a"), trainer_cls=faulty(at=9, steps=3))
    assert str(info.value).startswith(
        "training stopped at step 12: the last 3 steps in a row had non-finite gradients and "
        "were skipped (--max_consecutive_skips=3) (3 skipped in all); the last good checkpoint "
        f"in {tmp_path / 'a'} is kept.")


def test_a_loss_above_the_bound_recovers_and_without_trials_stops(tmp_path, capsys):
    # One step's loss times 1e6: finite, so no step is skipped, but the mean loss since the
    # last log line is far above the bound.
    config = _config(tmp_path / "a", loss_upper_bound=100.0, recover_trials=2,
                     checkpoint_every=0, max_consecutive_skips=100)
    recovered = job.run(config, trainer_cls=faulty(at=20, steps=1, factor=1e6))
    err = capsys.readouterr().err
    clean = job.run(config.replace(model_dir=str(tmp_path / "b")),
                    trainer_cls=faulty(at=20, steps=0))
    assert recovered["recoveries"] == 1
    assert recovered["weights_checksum"] == clean["weights_checksum"]
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    # Step loops of 4 and a checkpoint at every epoch end (16): the loop of steps 20-23.
    assert warning.startswith("warning: step 24: the mean training loss ")
    assert "is above --loss_upper_bound=100; restored " in warning
    assert warning.endswith("ckpt-16 (step 16) and going on, recovery 1 of 2 (--recover_trials)")
    with pytest.raises(TrainingStopped, match=r"^training stopped at step 24: the mean training "
                       r"loss [\d.e+]+ is above --loss_upper_bound=100 \(0 skipped in all\); "):
        job.run(config.replace(model_dir=str(tmp_path / "c"), recover_trials=0),
                trainer_cls=faulty(at=20, steps=1, factor=1e6))


def test_a_blow_up_that_recurs_spends_the_trials_then_stops(tmp_path, capsys):
    # NaN from step 2 on, however often it is replayed; no periodic checkpoint yet, so each
    # recovery goes back to the one saved at step 0 before training.
    with pytest.raises(TrainingStopped) as info:
        job.run(_config(tmp_path / "a", recover_trials=2, checkpoint_every=0),
                trainer_cls=faulty(at=2, steps=10 ** 6))
    assert str(info.value).startswith(
        "training stopped at step 5: the last 3 steps in a row had non-finite gradients and "
        "were skipped (--max_consecutive_skips=3) (3 skipped in all); 2 recoveries from the "
        "last checkpoint did not help (--recover_trials=2); the last good checkpoint")
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 2
    assert all("ckpt-0 (step 0) and going on" in line for line in warnings)
    assert warnings[1].endswith("recovery 2 of 2 (--recover_trials)")


def test_a_loop_without_checkpoints_stops_as_before(tmp_path):
    # fit() without a checkpointer (as each policy of --compare_policies trains) has nothing
    # to go back to: the config's recover_trials does not apply there.
    trainer = faulty(at=2, steps=10 ** 6)(_config(tmp_path / "a", recover_trials=2))
    with pytest.raises(TrainingStopped, match=r"^training stopped at step 5: .*; no checkpoint "
                                              r"was saved\."):
        fit_loop.fit(trainer)


def test_recovery_settings_are_checked():
    with pytest.raises(ConfigError, match=r"recover_trials=2 .*pass --model_dir"):
        small_config(recover_trials=2)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="loss_upper_bound must be"):
            small_config(loss_upper_bound=bad)


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import trainer
    from tests.test_recovery import _config, faulty
    trainer.run(_config(sys.argv[1], recover_trials=int(sys.argv[2]), verbose=True),
                trainer_cls=faulty(at=9, steps=3))
""")


def test_from_a_script_the_blow_up_is_one_error_line_and_recovery_one_warning(tmp_path):
    script = tmp_path / "blow_up.py"
    script.write_text(_SCRIPT.format(root=str(ROOT)))
    stopped = run_cli(str(tmp_path / "a"), "0", script=str(script))
    lines = user_stderr_lines(stopped.stderr)
    assert stopped.returncode == 1, stopped.stderr
    assert len(lines) == 1 and lines[0].startswith("error: training stopped at step 12: "), lines
    recovered = run_cli(str(tmp_path / "b"), "1", script=str(script))
    lines = user_stderr_lines(recovered.stderr)
    assert recovered.returncode == 0, recovered.stderr
    assert len(lines) == 1 and lines[0].startswith("warning: step 12: "), lines
    assert os.path.exists(tmp_path / "b" / "checkpoints" / "ckpt-32.index")


_WORKERS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import trainer
    from tests.test_recovery import _config, faulty
    trainer.run(_config(sys.argv[1], recover_trials=1, distribution="multi_worker",
                        verbose=True), trainer_cls=faulty(at=9, steps=3))
""")
WORKER_LINE = re.compile(r"worker (\d)/2[^:]*: global_step (\d+) "
                         r"weights_checksum (-?\d+\.\d+(?:e[-+]?\d+)?)")


def test_two_workers_recover_together(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG",)}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", str(script),
         str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    workers = {int(i): (int(step), checksum) for i, step, checksum in WORKER_LINE.findall(output)}
    # Both restored step 8 and trained on to the end, in step: the same final weights.
    assert sorted(workers) == [0, 1] and workers[0] == workers[1], output[-3000:]
    assert workers[0][0] == 2 * STEPS_PER_EPOCH
    # Only the chief says so, once.
    assert len(re.findall(r"warning: step 12: .* restored .*ckpt-8 \(step 8\) and going on",
                          output)) == 1, output[-3000:]
