"""The same model trained under Keras 3 and under Keras 2 ends with the same weights.

Each Keras needs its own process (TensorFlow picks one when it first loads Keras, from
TF_USE_LEGACY_KERAS): the Keras 2 run writes its initial weights, the Keras 3 run starts from
exactly those, both train 20 steps on the same batches, and the final weights are compared.
Also: the banner and metrics name the Keras, and objects of the other Keras are one error line.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, user_stderr_lines

from trainer import compat

pytestmark = pytest.mark.skipif(
    compat.TF_VERSION < (2, 16), reason="TensorFlow 2.15 has Keras 2 only")

# Runs in a child process: python -c TWIN POLICY WEIGHTS.npz OUT.npz [load]
TWIN = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[4])
from conftest import small_config
from trainer import compat
from trainer.core.steps import Trainer

policy, weights_file, out_file, load = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
trainer = Trainer(small_config(policy=policy, model="mlp", optimizer="adam",
                               learning_rate=1e-3, batch_size=32, steps_per_loop=1))
if load == "load":
    saved = np.load(weights_file)
    trainer.model.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])
else:
    np.savez(weights_file, **{f"w{i}": w for i, w in enumerate(trainer.model.get_weights())})
losses = []
for _ in range(20):
    trainer.train_metrics["loss"].reset_state()
    trainer.train_steps(1)
    losses.append(float(trainer.train_metrics["loss"].result()))
np.savez(out_file, losses=np.array(losses), major=compat.KERAS_MAJOR,
         **{f"w{i}": w for i, w in enumerate(trainer.model.get_weights())})
"""


def _twin(tmp_path, policy, keras_major, load):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if keras_major == 2:
        env["TF_USE_LEGACY_KERAS"] = "1"
    out = tmp_path / f"keras{keras_major}.npz"
    result = subprocess.run(
        [sys.executable, "-c", TWIN, policy, str(tmp_path / "initial.npz"), str(out),
         str(ROOT / "tests"), "load" if load else "save"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    assert int(saved["major"]) == keras_major
    weights = [saved[f"w{i}"] for i in range(len(saved.files) - 2)]
    return saved["losses"], weights


def _train_both(tmp_path, policy):
    losses2, weights2 = _twin(tmp_path, policy, 2, load=False)
    losses3, weights3 = _twin(tmp_path, policy, 3, load=True)
    assert [w.shape for w in weights2] == [w.shape for w in weights3]
    return losses2, weights2, losses3, weights3


def test_float32_keras_3_and_keras_2_train_to_the_same_weights(tmp_path):
    losses2, weights2, losses3, weights3 = _train_both(tmp_path, "float32")
    # The first step sees the same weights and the same batch: the same loss to float32
    # rounding (the ops are the same; their fusion may differ).
    assert losses3[0] == pytest.approx(losses2[0], rel=1e-6)
    # Adam's update is the same formula in both, and the layers run the same kernels: measured
    # bit-identical after 20 steps (Sapphire Rapids, TF 2.21, Keras 3.15 vs tf_keras 2.21).
    # The bound leaves room for another CPU fusing an op differently in one of them (ulps of
    # weights of order 0.1), yet is 1/20000 of how far the weights moved (2e-2): a step more
    # or less, another learning rate, an unscaled or twice-reduced gradient all exceed it.
    for a, b in zip(weights2, weights3):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(losses3, losses2, rtol=1e-6)
    moved = max(np.abs(a - b).max() for a, b in zip(weights2, np.load(tmp_path / "initial.npz")
                                                   .values()))
    assert moved > 1e-3  # The weights did train.


def test_mixed_bfloat16_keras_3_and_keras_2_stay_within_a_bound(tmp_path):
    losses2, weights2, losses3, weights3 = _train_both(tmp_path, "mixed_bfloat16")
    # Measured bit-identical here too. Where a CPU fuses differently, bf16 (8 bits of
    # mantissa) can flip the last bit of an activation (0.4%) and Adam turns a gradient sign
    # flip into a full lr-sized step (1e-3): the bound, 2e-3, allows two such steps of one
    # weight, a tenth of how far the weights moved; the losses stay within 0.5%.
    for a, b in zip(weights2, weights3):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-3)
    np.testing.assert_allclose(losses3, losses2, rtol=5e-3)


def test_banner_and_metrics_name_the_keras(tmp_path):
    from conftest import run_cli

    metrics = tmp_path / "m.json"
    result = run_cli("--dataset=synthetic", "--synthetic_examples=256", "--epochs=1",
                     "--batch_size=32", f"--metrics_file={metrics}",
                     env={"TF_USE_LEGACY_KERAS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| Keras 2." in result.stdout and "(tf_keras)" in result.stdout
    assert json.loads(metrics.read_text())["keras"].startswith("Keras 2.")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--dataset=synthetic", "--synthetic_examples=256",
         "--epochs=1", "--batch_size=32", f"--metrics_file={metrics}.3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| Keras 3." in result.stdout
    assert json.loads(open(f"{metrics}.3").read())["keras"].startswith("Keras 3.")


OTHER_KERAS_SCRIPT = r"""
import sys
import trainer

kind = sys.argv[1]
if kind == "keras2-model":
    import tf_keras as other
elif kind == "keras3-model":
    import keras as other


class OtherTrainer(trainer.Trainer):
    def build_model(self):
        inputs = other.Input(shape=self.datasets.input_shape)
        x = other.layers.Flatten()(inputs)
        outputs = other.layers.Dense(self.datasets.num_classes, dtype="float32")(x)
        return other.Model(inputs, outputs)


trainer.run(trainer.TrainConfig(dataset="synthetic", synthetic_examples=256, epochs=1,
                                batch_size=32, model="other"), trainer_cls=OtherTrainer)
"""


@pytest.mark.parametrize("kind, legacy, message", [
    ("keras2-model", None, "is a Keras 2 Functional (built with tf_keras), but this run uses "
                           "Keras 3"),
    ("keras3-model", "1", "is a Keras 3 Functional (built with `import keras`), but this run "
                          "uses Keras 2"),
])
def test_a_model_of_the_other_keras_is_one_error_line(tmp_path, kind, legacy, message):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    if legacy:
        env["TF_USE_LEGACY_KERAS"] = legacy
    result = subprocess.run([sys.executable, "-c", OTHER_KERAS_SCRIPT, kind], cwd=tmp_path,
                            env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    lines = user_stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0]
    assert "TF_USE_LEGACY_KERAS" in lines[0]
    assert "Traceback" not in result.stderr


def test_another_keras_backend_is_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--dataset=synthetic"],
                            cwd=tmp_path, env=dict(env, KERAS_BACKEND="jax",
                                                   TF_CPP_MIN_LOG_LEVEL="2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = user_stderr_lines(result.stderr)
    assert len(lines) == 1 and "KERAS_BACKEND=tensorflow" in lines[0], result.stderr[-2000:]


def test_nothing_in_the_package_sets_tf_use_legacy_keras():
    for path in (ROOT / "trainer").rglob("*.py"):
        text = path.read_text()
        assert "environ.setdefault(\"TF_USE_LEGACY_KERAS\"" not in text, path
        assert "environ[\"TF_USE_LEGACY_KERAS\"]" not in text, path
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    code = ("import os, trainer; from trainer import compat; import trainer.job; "
            "print(os.environ.get('TF_USE_LEGACY_KERAS'), compat.KERAS_MAJOR)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["None", "3"], out.stderr[-2000:]


USER_SCRIPT = r"""
import json
import sys

STYLE, POLICY, OUT = sys.argv[1:4]
if STYLE == "tf.keras":
    import tensorflow as tf  # TensorFlow first, and tf.keras touched before trainer.
    keras = tf.keras
    keras.backend.clear_session()
else:
    import keras

import trainer


class UserTrainer(trainer.Trainer):
    def build_model(self):
        inputs = keras.Input(shape=self.datasets.input_shape)
        x = keras.layers.Flatten()(inputs)
        x = keras.layers.Dense(32, activation="relu")(x)
        x = keras.layers.Dense(self.datasets.num_classes)(x)
        outputs = keras.layers.Activation("softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="user_model")


summary = trainer.run(trainer.TrainConfig(policy=POLICY, dataset="synthetic",
                                          synthetic_examples=512, epochs=2, batch_size=32,
                                          model="user_model"), trainer_cls=UserTrainer)
print(json.dumps({k: summary[k] for k in ("keras", "global_step", "policy", "test_accuracy",
                                          "loss_scale_mode")}), file=open(OUT, "w"))
"""


@pytest.mark.parametrize("style", ["import keras", "tf.keras"])
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float32"])
def test_a_users_keras_3_script_trains(tmp_path, style, policy):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-c", USER_SCRIPT, style, policy, str(out)],
                            cwd=tmp_path, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["keras"].startswith("Keras 3.")
    assert summary["global_step"] == 2 * (512 * 9 // 10 // 32)  # 14 steps per epoch, 2 epochs.
    assert summary["policy"] == policy
    assert summary["loss_scale_mode"] == ("dynamic" if policy == "mixed_bfloat16" else "none")
    assert summary["test_accuracy"] > 0.15  # Synthetic classes are learnable: above chance.


def test_a_model_dir_written_under_keras_2_is_refused_under_keras_3_and_resumes_under_2(tmp_path):
    model_dir = tmp_path / "run"
    args = ["--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
            f"--model_dir={model_dir}"]
    env2 = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env3 = dict(env2)
    env2["TF_USE_LEGACY_KERAS"] = "1"

    def run(env, *extra):
        return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, *extra], cwd=ROOT,
                              env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                              text=True, timeout=300)

    first = run(env2, "--epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    refused = run(env3, "--epochs=2")
    assert refused.returncode == 1
    lines = user_stderr_lines(refused.stderr)
    assert len(lines) == 1 and "written under Keras 2" in lines[0], refused.stderr[-2000:]
    assert "set TF_USE_LEGACY_KERAS=1" in lines[0]
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    resumed = run(env2, "--epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resum" in (resumed.stdout + resumed.stderr).lower()
