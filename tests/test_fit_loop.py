"""fit / FitLoop: evaluation, checkpoints, logs and stop checks, and what the step options compute."""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import pytest

from tests.conftest import small_config
from trainer import job
from trainer.compat import tf
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped
from trainer.loop import fit_loop
from trainer.loop.actions import PeriodicAction


def _weights(trainer):
    return [w.numpy() for w in trainer.model.trainable_weights]


@pytest.mark.parametrize("loss_scale", ["none", "dynamic"])
def test_grad_accumulation_matches_one_big_batch(loss_scale):
    common = dict(policy="float32", optimizer="sgd", learning_rate=0.1, batch_size=32,
                  loss_scale=loss_scale, deterministic=True)
    whole = Trainer(small_config(**common))
    micro = Trainer(small_config(grad_accum_steps=4, **common))
    for a, b in zip(_weights(whole), _weights(micro)):
        np.testing.assert_array_equal(a, b)
    whole.train_steps(3)
    micro.train_steps(3)
    assert int(micro.global_step.numpy()) == 3  # One optimizer step per 4 micro-batches.
    for a, b in zip(_weights(whole), _weights(micro)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The logged loss is the unscaled per-example mean, whatever the split.
    np.testing.assert_allclose(whole.train_results()["loss"], micro.train_results()["loss"],
                               rtol=1e-5)


def test_clip_norm_applies_to_unscaled_gradients():
    # SGD with lr 1 and a tiny clip: each step moves the weights by at most clip_norm.
    config = small_config(optimizer="sgd", learning_rate=1.0, clip_norm=1e-3,
                          policy="mixed_bfloat16", loss_scale="dynamic")
    trainer = Trainer(config)
    before = _weights(trainer)
    trainer.train_steps(1)
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(_weights(trainer), before)))
    # Clipping the scaled gradient (x32768) and unscaling afterwards would move the weights
    # 32768 times less than clip_norm.
    np.testing.assert_allclose(moved, 1e-3, rtol=1e-3)


def test_jit_compile_gives_the_same_loss_curve():
    def curve(jit):
        trainer = Trainer(small_config(jit_compile=jit, policy="float32", synthetic_examples=512))
        losses = []
        for _ in range(4):
            trainer.train_results(reset=True)
            trainer.train_steps(4)
            losses.append(trainer.train_results()["loss"])
        return losses

    np.testing.assert_allclose(curve(True), curve(False), rtol=1e-4)


def test_non_finite_storm_stops_training():
    class Diverging(Trainer):
        def compute_loss(self, labels, outputs):
            return super().compute_loss(labels, outputs) * float("inf")

    trainer = Diverging(small_config(max_consecutive_skips=5, steps_per_loop=3,
                                     synthetic_examples=1024))
    with pytest.raises(TrainingStopped, match="non-finite"):
        fit_loop.fit(trainer)
    assert int(trainer.consecutive_skips.numpy()) >= 5
    assert int(trainer.skipped_steps.numpy()) == int(trainer.global_step.numpy())


class FloorTrainer(Trainer):
    """Non-finite at steps 0-13 (the dynamic scale halves 2**15 -> 2), finite at step 14,
    non-finite from step 15 on: that skip halves the scale to its floor of 1."""

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        step = self.global_step
        poison = tf.where(tf.logical_or(step < 14, step >= 15), np.inf, 1.0)
        return loss * tf.cast(poison, loss.dtype)


def test_a_skip_with_the_scale_at_its_floor_stops_the_loop_at_that_step():
    # The limit of 1000 skips in a row is far away (the storm at the end is one skip long):
    # what stops the run is the floor, at the step that reached it.
    trainer = FloorTrainer(small_config(policy="mixed_bfloat16", loss_scale="dynamic",
                                        max_consecutive_skips=1000, synthetic_examples=1024))
    trainer.train_steps(32)  # One compiled loop: it ends at the floor, not after 32 steps.
    assert int(trainer.global_step.numpy()) == 16
    assert trainer.loss_scale == 1.0
    assert int(trainer.consecutive_skips.numpy()) == 1
    assert int(trainer.skipped_steps.numpy()) == 15
    trainer.train_steps(8)  # At the floor with a skip pending: not one more step.
    assert int(trainer.global_step.numpy()) == 16
    # What fit calls after each loop names the floor (not the limit) as the reason.
    with pytest.raises(TrainingStopped) as info:
        fit_loop.check_non_finite(trainer, 1000)
    assert str(info.value).startswith(
        "training stopped at step 16: gradients are non-finite with the loss scale at its "
        "floor (1) (15 skipped in all); no checkpoint was saved.")


def test_tensorboard_events_hold_the_scalars(tmp_path):
    model_dir = str(tmp_path / "run")
    job.run(small_config(model_dir=model_dir, validation_split=0.25, epochs=2))
    tags = {}
    for split in ("train", "validation"):
        for path in glob.glob(os.path.join(model_dir, split, "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    tags.setdefault(split, {})[value.tag] = event.step
    assert {"loss", "accuracy", "loss_scale", "learning_rate", "examples_per_sec",
            "skipped_steps"} <= set(tags["train"])
    assert {"loss", "accuracy"} <= set(tags["validation"])
    assert tags["train"]["loss"] == 2 * (192 // 32)  # Last write at the final step.


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [0.1, 0.1, 0.1]),
    ("constant", 4, [0.0, 0.05, 0.1]),
    ("cosine", 0, [0.1, 0.05, 0.0]),
])
def test_learning_rate_schedules(schedule, warmup, expected):
    from trainer.core import optimizers

    lr = optimizers.schedule(schedule, 0.1, total_steps=8, warmup_steps=warmup)
    values = [float(lr(s)) if callable(lr) else lr for s in (0, 2 if warmup else 4, 8)]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_user_actions_run_on_their_schedule_through_app_run():
    seen = []
    summary = job.run(small_config(epochs=2),
                      actions=[PeriodicAction(lambda step, now: seen.append(step), every_steps=3)])
    assert summary["global_step"] == 2 * (256 // 32)
    assert seen == [3, 6, 9, 12, 15]


def test_progress_bar_draws_the_values_it_is_given(capsys):
    from trainer.outputs import console

    trainer = Trainer(small_config())
    bar = console.ProgressBar(8, trainer.train_metrics)
    for step in (4, 8):
        trainer.train_steps(4)
        bar.update(step, {**trainer.train_results(), "loss_scale": trainer.loss_scale})
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # Keras 3 draws in bold.
    assert "8/8 " in out and "loss:" in out and "loss_scale: 32768" in out


def test_final_step_is_always_evaluated_and_considered_for_the_best(tmp_path):
    # 14 steps in loops of 7, evaluated every 5: steps 5, 10 and then the final 14.
    model_dir = str(tmp_path / "run")
    summary = job.run(small_config(synthetic_examples=14 * 32 * 4 // 3, validation_split=0.25,
                                   steps_per_loop=7, eval_every=5, model_dir=model_dir,
                                   best_metric="loss"))
    assert summary["global_step"] == 14
    assert [h["step"] for h in summary["history"]] == [5, 10, 14]
    losses = {h["step"]: h["val_loss"] for h in summary["history"]}
    best = tf.train.latest_checkpoint(os.path.join(model_dir, "best"))
    assert int(best.rsplit("-", 1)[1]) == min(losses, key=losses.get)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest.endswith("ckpt-14")


def test_best_metric_defaults_to_loss_without_accuracy_and_every_metric_is_reported(tmp_path):
    from trainer.compat import keras

    class Regression(Trainer):
        """Predicts the label as a number: no accuracy, a custom 'mae' metric."""

        def build_model(self):
            inputs = keras.Input(self.datasets.input_shape)
            x = keras.layers.Dense(1, dtype="float32")(keras.layers.Flatten()(inputs))
            return keras.Model(inputs, keras.layers.Reshape((), dtype="float32")(x))

        def compute_loss(self, labels, outputs):
            return tf.square(tf.cast(labels, tf.float32) - outputs)

        def build_metrics(self):
            return {"mae": keras.metrics.MeanAbsoluteError(name="mae")}

        def update_metrics(self, metrics, labels, outputs):
            metrics["mae"].update_state(tf.cast(labels, tf.float32)[:, None], outputs[:, None])

    # No --model_dir: no checkpoint, so best_metric is not even looked at.
    summary = job.run(small_config(validation_split=0.25), trainer_cls=Regression)
    assert {"test_loss", "test_mae", "val_loss", "val_mae"} <= set(summary)
    assert "test_accuracy" not in summary
    summary = job.run(small_config(validation_split=0.25, model_dir=str(tmp_path / "r")),
                      trainer_cls=Regression)
    assert os.path.exists(os.path.join(tmp_path, "r", "best", "checkpoint"))


def test_scale_stuck_at_floor_warns(capsys):
    trainer = Trainer(small_config(loss_scale="dynamic", epochs=1))
    trainer.loss_scaler.state.scale.assign(1.0)
    fit_loop.fit(trainer)
    assert "loss scale is stuck at its floor (1)" in capsys.readouterr().err


def test_eval_every_interleaves_evaluation_and_keeps_the_best(tmp_path):
    model_dir = str(tmp_path / "run")
    summary = job.run(small_config(model_dir=model_dir, eval_every=4, epochs=2,
                                   validation_split=0.25, best_metric="loss"))
    assert [h["step"] for h in summary["history"]] == [4, 8, 12]  # 6 steps per epoch.
    assert all("val_loss" in h for h in summary["history"])
    best = tf.train.latest_checkpoint(os.path.join(model_dir, "best"))
    best_step = int(best.rsplit("-", 1)[1])
    losses = {h["step"]: h["val_loss"] for h in summary["history"]}
    assert best_step == min(losses, key=losses.get)


def test_unknown_best_metric_is_refused_before_training(tmp_path):
    from trainer.errors import UserError

    model_dir = tmp_path / "run"
    with pytest.raises(UserError, match="unknown best_metric 'acc'; this model reports loss, "
                                        "accuracy"):
        job.run(small_config(best_metric="acc", model_dir=str(model_dir)))
    assert not (model_dir / "checkpoints").exists()  # Refused before anything was saved.


@pytest.mark.parametrize("loss_scale", ["none", "dynamic"])
def test_a_run_that_ends_non_finite_fails_instead_of_reporting_nan(loss_scale):
    """--learning_rate=1e30: the first (finite) update blows the weights up, later steps are
    skipped; the run must not end with exit 0 and `test: loss nan`."""
    with pytest.raises(TrainingStopped, match=r"training diverged: the test loss is not "
                                                    r"finite \(\d+ non-finite steps"):
        job.run(small_config(learning_rate=1e30, loss_scale=loss_scale))


def _checkpoint_steps(directory):
    state = tf.train.get_checkpoint_state(directory)
    paths = state.all_model_checkpoint_paths if state else []
    return [int(path.rsplit("-", 1)[1]) for path in paths]


def _saved_global_step(path):
    """The optimizer's step counter (the global step) as stored in the checkpoint ``path``."""
    # Keras 3's loss-scale wrapper keeps the inner optimizer's counter under inner_optimizer/
    # (its own _iterations is unused); Keras 2's delegates, so it is optimizer/_iterations.
    names = {name for name, _ in tf.train.list_variables(path)}
    key = "optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    if key not in names:
        key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    return int(tf.train.load_variable(path, key))


def test_final_step_is_saved_when_it_is_not_a_checkpoint_step(tmp_path):
    from trainer.outputs.checkpoint import Checkpointer

    # 3 epochs of 7 steps = 21 steps; checkpoints every 5 (21 % 5 != 0), loops of 4.
    config = small_config(synthetic_examples=7 * 32, epochs=3, checkpoint_every=5,
                          model_dir=str(tmp_path), policy="float32")
    trainer = Trainer(config)
    assert trainer.datasets.steps_per_epoch == 7
    checkpointer = Checkpointer(trainer, model_dir=str(tmp_path), keep=10)
    result = fit_loop.fit(trainer, checkpointer=checkpointer)
    assert result.stopped_by is None and int(trainer.global_step.numpy()) == 21
    directory = os.path.join(str(tmp_path), "checkpoints")
    # Every 5th step, and the final step (21) on top.
    assert _checkpoint_steps(directory) == [5, 10, 15, 20, 21]
    latest = tf.train.latest_checkpoint(directory)
    assert latest.endswith("ckpt-21") and _saved_global_step(latest) == 21
    assert checkpointer.last_saved_step == 21
    # What a resume restores is the final state, not step 20's.
    resumed = Trainer(config)
    assert Checkpointer(resumed, model_dir=str(tmp_path)).restore_or_initialize() == latest
    assert int(resumed.global_step.numpy()) == 21
    for a, b in zip(_weights(trainer), _weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_job_keeps_the_final_step_among_the_newest_checkpoints(tmp_path):
    # The same schedule through job.run, which keeps keep_checkpoints=3 (the default).
    model_dir = str(tmp_path / "run")
    summary = job.run(small_config(synthetic_examples=7 * 32, epochs=3, checkpoint_every=5,
                                   model_dir=model_dir))
    assert summary["global_step"] == 21
    directory = os.path.join(model_dir, "checkpoints")
    assert _checkpoint_steps(directory) == [15, 20, 21]
    latest = tf.train.latest_checkpoint(directory)
    assert latest.endswith("ckpt-21") and _saved_global_step(latest) == 21
