"""Checkpoints: state survives a restore, damaged checkpoints, foreign model_dirs."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pytest

from tests.conftest import small_config
from trainer import compat, job
from trainer.compat import tf
from trainer.core.steps import Trainer
from trainer.errors import UserError
from trainer.outputs import checkpoint, layout


def _folder_hashes(folder):
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return result


def _checkpointed_trainer(model_dir, **overrides):
    trainer = Trainer(small_config(**overrides))
    return trainer, checkpoint.Checkpointer(trainer, model_dir=str(model_dir), keep=5)


class EarlySkipsTrainer(Trainer):
    """Non-finite at steps 0-4: five skips halve the dynamic scale from 2**15 to 1024."""

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        return loss * tf.cast(tf.where(self.global_step < 5, np.inf, 1.0), loss.dtype)


def test_loss_scale_good_steps_and_slots_survive_restore(tmp_path):
    trainer = EarlySkipsTrainer(small_config(loss_scale="dynamic"))
    ckpt = checkpoint.Checkpointer(trainer, model_dir=str(tmp_path), keep=5)
    # Five skipped steps move the scale away from its initial value, so a restore that
    # skipped it would show; three finite ones move the good-step counter.
    trainer.train_steps(8)
    saved = {
        "scale": trainer.loss_scale,
        "good": int(trainer.loss_scaler.good_steps),
        "step": int(trainer.global_step.numpy()),
        "slots": [v.numpy().copy() for v in trainer.optimizer.variables],
        "weights": [w.numpy().copy() for w in trainer.model.weights],
    }
    assert saved["scale"] == 1024.0 and saved["good"] == 3 and saved["step"] == 8
    path = ckpt.save()

    fresh, fresh_ckpt = _checkpointed_trainer(tmp_path, loss_scale="dynamic")
    assert fresh.loss_scale == 2.0 ** 15  # Not yet restored: the initial state.
    assert fresh_ckpt.restore_or_initialize() == path
    assert fresh.loss_scale == saved["scale"]
    assert int(fresh.loss_scaler.good_steps) == saved["good"]
    assert int(fresh.global_step.numpy()) == saved["step"]
    assert len(fresh.optimizer.variables) == len(saved["slots"]) > 2
    for restored, expected in zip(fresh.optimizer.variables, saved["slots"]):
        np.testing.assert_array_equal(restored.numpy(), expected)
    for restored, expected in zip(fresh.model.weights, saved["weights"]):
        np.testing.assert_array_equal(restored.numpy(), expected)


def test_resume_continues_the_same_data_order(tmp_path):
    straight = Trainer(small_config(deterministic=True))
    straight.train_steps(12)

    first, ckpt = _checkpointed_trainer(tmp_path, deterministic=True)
    first.train_steps(5)
    ckpt.save()
    second, second_ckpt = _checkpointed_trainer(tmp_path, deterministic=True)
    second_ckpt.restore_or_initialize()
    second.train_steps(7)
    assert second.weights_checksum() == straight.weights_checksum()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    trainer, ckpt = _checkpointed_trainer(tmp_path)
    trainer.train_steps(2)
    older = ckpt.save()
    older_weights = [w.numpy().copy() for w in trainer.model.weights]
    trainer.train_steps(2)
    newest = ckpt.save()
    _truncate(newest + ".data-00000-of-00001")

    fresh, fresh_ckpt = _checkpointed_trainer(tmp_path)
    assert fresh_ckpt.restore_or_initialize() == older
    assert int(fresh.global_step.numpy()) == 2
    for restored, expected in zip(fresh.model.weights, older_weights):
        np.testing.assert_array_equal(restored.numpy(), expected)
    assert f"checkpoint {newest} cannot be read" in capsys.readouterr().err


def test_all_checkpoints_damaged_is_a_clear_error_not_a_fresh_start(tmp_path):
    trainer, ckpt = _checkpointed_trainer(tmp_path)
    trainer.train_steps(2)
    _truncate(ckpt.save() + ".index")
    _, fresh_ckpt = _checkpointed_trainer(tmp_path)
    with pytest.raises(UserError, match="no checkpoint in .* can be restored"):
        fresh_ckpt.restore_or_initialize()


@pytest.mark.parametrize("change, message", [
    ({"model_args": {"units": 24}}, "model_args"),
    ({"policy": "float32"}, "policy"),
    ({"optimizer": "sgd"}, "optimizer"),
])
def test_model_dir_of_another_run_is_refused_and_left_unchanged(tmp_path, change, message):
    model_dir = str(tmp_path / "run")
    job.run(small_config(model_dir=model_dir))
    before = _folder_hashes(model_dir)
    assert any(name.startswith("checkpoints/ckpt-") for name in before)
    with pytest.raises(UserError, match=f"its {message}.*Nothing was changed"):
        job.run(small_config(model_dir=model_dir, **change))
    assert _folder_hashes(model_dir) == before


def test_checkpoints_without_run_json_are_refused_and_left_unchanged(tmp_path):
    # run.json names the model the checkpoints belong to; without it nothing says whether
    # they fit, so the run stops instead of guessing (or starting over them).
    model_dir = tmp_path / "run"
    job.run(small_config(model_dir=str(model_dir)))
    (model_dir / layout.RUN_FILE).unlink()
    before = _folder_hashes(model_dir)
    assert any(name.startswith("checkpoints/ckpt-") for name in before)
    with pytest.raises(UserError) as info:
        job.run(small_config(model_dir=str(model_dir)))
    assert str(info.value) == (f"{model_dir} holds checkpoints but no run.json, so their model "
                               "is unknown; use a new --model_dir")
    assert _folder_hashes(model_dir) == before


def test_a_folder_without_run_json_or_checkpoints_is_a_fresh_start(tmp_path):
    model_dir = tmp_path / "run"
    (model_dir / "notes").mkdir(parents=True)  # Something else already there: fine.
    summary = job.run(small_config(model_dir=str(model_dir)))
    assert summary["global_step"] == 256 // 32
    assert (model_dir / layout.RUN_FILE).is_file()
    assert (model_dir / "notes").is_dir()


@pytest.mark.parametrize("first, then", [
    ("mixed_bfloat16", "float32"),
    ("float32", "mixed_bfloat16"),
])
def test_allow_policy_change_resumes_both_ways(tmp_path, capsys, first, then):
    model_dir = str(tmp_path / "run")
    done = job.run(small_config(model_dir=model_dir, policy=first))
    weights = _restored_weights(model_dir, policy=first)
    second = Trainer(small_config(model_dir=model_dir, policy=then, allow_policy_change=True))
    ckpt = checkpoint.Checkpointer(second, model_dir=model_dir)
    assert ckpt.restore_or_initialize().endswith(f"ckpt-{done['global_step']}")
    for restored, expected in zip(second.model.weights, weights):
        np.testing.assert_array_equal(restored.numpy(), expected)  # float32 variables both ways.
    if then == "mixed_bfloat16":  # The float32 run had no loss scale: a fresh one, said so.
        assert second.loss_scale == 2.0 ** 15
        assert any("holds no loss-scale state" in note for note in ckpt.notes)
    resumed = job.run(small_config(model_dir=model_dir, policy=then, epochs=2,
                                   allow_policy_change=True, verbose=True))
    assert resumed["global_step"] == 2 * done["global_step"]
    assert f"at step {done['global_step']}" in capsys.readouterr().out


def _restored_weights(model_dir, **overrides):
    trainer = Trainer(small_config(**overrides))
    checkpoint.Checkpointer(trainer, model_dir=model_dir).restore_or_initialize()
    return [w.numpy().copy() for w in trainer.model.weights]


@pytest.mark.parametrize("first, then, note", [
    ("none", "dynamic", "starting a fresh dynamic scale"),
    ("dynamic", "none", "left unused"),
    ("dynamic", 64.0, "left unused"),
])
def test_loss_scale_mode_change_resumes_with_a_fresh_scale_state(tmp_path, capsys, first, then,
                                                                 note):
    model_dir = str(tmp_path / "run")
    done = job.run(small_config(model_dir=model_dir, loss_scale=first))
    resumed = job.run(small_config(model_dir=model_dir, loss_scale=then, epochs=2,
                                   verbose=True))
    assert resumed["global_step"] == 2 * done["global_step"]
    out = capsys.readouterr().out
    assert note in out and f"at step {done['global_step']}" in out
    assert resumed["loss_scale"] == {"none": 1.0, "dynamic": 2.0 ** 15}.get(then, then)


def test_mismatch_is_not_reported_as_damage(tmp_path, capsys):
    """A readable checkpoint of other code (here: an extra variable) is refused as a mismatch,
    and no older checkpoint is tried in its place."""
    trainer, ckpt = _checkpointed_trainer(tmp_path)
    trainer.train_steps(2)
    ckpt.save()

    class WithExtraState(Trainer):
        def checkpoint_items(self):
            return {**super().checkpoint_items(), "extra": tf.Variable(1.0, name="extra")}

    other = WithExtraState(small_config())
    with pytest.raises(checkpoint.CheckpointMismatch, match="does not fit this program.*not "
                                                            "damaged"):
        checkpoint.Checkpointer(other, model_dir=str(tmp_path)).restore_or_initialize()
    assert "cannot be read" not in capsys.readouterr().err


@pytest.mark.parametrize("change", [{"seed": 8}, {"validation_split": 0.25},
                                    {"synthetic_examples": 512}])
def test_input_stream_changes_are_refused_on_resume(tmp_path, change):
    model_dir = str(tmp_path / "run")
    job.run(small_config(model_dir=model_dir))
    with pytest.raises(UserError, match=f"its {next(iter(change))} is"):
        job.run(small_config(model_dir=model_dir, **change))


def test_data_files_identity_is_part_of_the_guard(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.gz").write_bytes(b"one")
    before = checkpoint.data_fingerprint(str(folder))
    (folder / "a.gz").write_bytes(b"two")  # Same size, other content.
    assert checkpoint.data_fingerprint(str(folder)) != before
    assert checkpoint.data_fingerprint("synthetic") == {}


def test_best_checkpoint_is_kept_separately(tmp_path):
    model_dir = str(tmp_path / "run")
    job.run(small_config(model_dir=model_dir, epochs=3, validation_split=0.25))
    best = tf.train.latest_checkpoint(os.path.join(model_dir, "best"))
    assert best is not None and os.path.basename(best).startswith("best-")
    values = dict(tf.train.list_variables(best))
    assert "best_value/.ATTRIBUTES/VARIABLE_VALUE" in values


# ------------------------------------------------------------------ killed and resumed runs

_RUN_ARGS = ("--dataset=synthetic", "--synthetic_examples=8192", "--validation_split=0",
             "--batch_size=64", "--epochs=5", "--model_args=units=256", "--device=cpu",
             "--steps_per_loop=10", "--checkpoint_every=20", "--deterministic", "--progress=log")


def _start(model_dir, metrics_file):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *_RUN_ARGS, f"--model_dir={model_dir}",
         f"--metrics_file={metrics_file}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(model_dir, process, min_step, timeout=120):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        if latest and int(latest.rsplit("-", 1)[1]) >= min_step:
            return int(latest.rsplit("-", 1)[1])
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    import json
    import signal

    reference = _start(tmp_path / "straight", tmp_path / "straight.json")
    assert reference.wait(timeout=300) == 0, reference.communicate()

    killed = _start(tmp_path / "killed", tmp_path / "killed.json")
    step = _wait_for_checkpoint(str(tmp_path / "killed"), killed, min_step=60)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists()  # It really died before the end.

    resumed = _start(tmp_path / "killed", tmp_path / "killed.json")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    resumed_at = int(re.search(r"resuming from \S+ at step (\d+)", out).group(1))
    assert resumed_at >= step  # The newest checkpoint before the kill (it may be newer).
    straight = json.loads((tmp_path / "straight.json").read_text())
    after = json.loads((tmp_path / "killed.json").read_text())
    assert after["global_step"] == straight["global_step"] == 5 * (8192 // 64)
    assert after["weights_checksum"] == straight["weights_checksum"]  # Bit-identical.
    assert after["test_loss"] == straight["test_loss"]


def test_workers_that_restore_different_steps_stop_with_one_error(tmp_path):
    # Two real workers, each started in its own folder with the same relative --model_dir:
    # what a --model_dir on a disk the workers do not share looks like. The chief's folder
    # holds a finished run's checkpoint (step 8), the other worker's holds nothing (step 0).
    import subprocess
    import sys

    from tests.conftest import ROOT, user_stderr_lines

    flags = ["--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
             "--model_args=units=16", "--epochs=1", "--validation_split=0", "--device=cpu",
             "--policy=float32", "--progress=none", "--model_dir=run"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRAINER_", "OMPI_", "HOROVOD_")) and k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for rank in (0, 1):
        (tmp_path / f"w{rank}").mkdir()
    first = subprocess.run([sys.executable, str(ROOT / "run.py"), *flags], cwd=tmp_path / "w0",
                           env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    chief_files = _folder_hashes(tmp_path / "w0" / "run")
    worker = f'cd "w$TRAINER_RANK" && exec "{sys.executable}" "{ROOT / "run.py"}" ' + \
        " ".join(flags) + " --distribution=multi_worker"
    job = subprocess.run([sys.executable, "-m", "trainer.launch", "--num_workers=2", "--grace_s=5",
                          "--", "sh", "-c", worker], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240, env=dict(env, PYTHONPATH=str(ROOT)))
    assert job.returncode == 1, job.stdout[-3000:]
    expected = ("error: the workers restored different steps from run: it must be on a file "
                "system that every worker can read (the chief writes, all restore)")
    # Both workers stop, each with that one line and no traceback.
    for rank in (0, 1):
        lines = user_stderr_lines("\n".join(line[5:] for line in job.stdout.splitlines()
                                            if line.startswith(f"[w{rank}] ")))
        assert expected in lines, job.stdout[-3000:]
        assert not any("Traceback" in line for line in lines)
    assert "resuming from" not in job.stdout  # Stopped before a step, a print or a save.
    assert _folder_hashes(tmp_path / "w0" / "run") == chief_files


def test_dropout_rng_state_resumes_bit_identically(tmp_path):
    # The cnn has dropout, whose RNG state tf.train.Checkpoint(model=...) does not reach under
    # either Keras (Keras 3: SeedGenerator variables; Keras 2: a tf.random.Generator made at
    # the first draw): the Trainer saves it as `model_rng`. 3 + (restore) + 3 steps must
    # equal 6 straight steps, and the restored state must be the saved one.
    config = small_config(model="cnn", model_args={"width": 4, "depth": 1}, deterministic=True,
                          optimizer="sgd", learning_rate=0.05)
    straight = Trainer(config)
    straight.train_steps(6)

    first = Trainer(config)
    first_ckpt = checkpoint.Checkpointer(first, model_dir=str(tmp_path), keep=5)
    first.train_steps(3)
    rng_at_save = [v.numpy().copy() for v in compat.rng_variables(first.model)]
    first_ckpt.save()
    first.train_steps(3)  # Moves the RNG state on, as the run went on before it was killed.

    resumed = Trainer(config)
    resumed_ckpt = checkpoint.Checkpointer(resumed, model_dir=str(tmp_path), keep=5)
    assert resumed_ckpt.restore_or_initialize() is not None
    for restored, saved in zip(compat.rng_variables(resumed.model), rng_at_save):
        np.testing.assert_array_equal(restored.numpy(), saved)
    resumed.train_steps(3)
    assert int(resumed.global_step.numpy()) == 6
    assert resumed.weights_checksum() == straight.weights_checksum() == first.weights_checksum()
    assert rng_at_save  # The dropout state really is extra state to save.


def test_a_checkpoint_without_dropout_rng_state_resumes_with_a_note(tmp_path, monkeypatch):
    # Checkpoints of earlier versions hold no `model_rng`: they still resume (under Keras 2,
    # which wrote them), saying that dropout masks restart from the seed. (deterministic: Keras
    # 2 keeps dropout state in variables only then.)
    config = small_config(model="cnn", model_args={"width": 4, "depth": 1}, deterministic=True)
    old = Trainer(config)
    items = old.checkpoint_items()
    assert "model_rng" in items
    monkeypatch.setattr(old, "checkpoint_items",
                        lambda: {k: v for k, v in items.items() if k != "model_rng"})
    old.train_steps(2)
    path = checkpoint.Checkpointer(old, model_dir=str(tmp_path)).save()
    assert not any(n.startswith("model_rng") for n, _ in tf.train.list_variables(path))

    new = Trainer(config)
    ckpt = checkpoint.Checkpointer(new, model_dir=str(tmp_path))
    assert ckpt.restore_or_initialize() == path
    assert int(new.global_step.numpy()) == 2
    assert new.weights_checksum() == old.weights_checksum()
    assert any("no dropout RNG state" in note for note in ckpt.notes), ckpt.notes
