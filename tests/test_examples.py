"""The examples README.md and docs/data.md show: they are the files in examples/ (or run as shown),
their losses are right, and they train."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
from conftest import ROOT, run_cli, small_config

from trainer import data
from trainer.compat import mixed_precision, tf

EXAMPLE = ROOT / "examples" / "custom_trainer.py"
AUTOENCODER = ROOT / "examples" / "autoencoder.py"
# The examples import the package as an installed user would: the root goes on PYTHONPATH.
EXAMPLE_ENV = {"PYTHONPATH": str(ROOT)}


def _load_example(path=EXAMPLE):
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert EXAMPLE.read_text() in blocks


def test_example_loss_metrics_and_dtypes():
    module = _load_example()
    trainer = module.SmoothedCNNTrainer(small_config(policy="mixed_bfloat16"))
    assert isinstance(trainer.optimizer, mixed_precision.LossScaleOptimizer)
    assert trainer.model.name == "small_cnn"
    assert [l.compute_dtype for l in trainer.model.layers if "conv" in l.name] == ["bfloat16"] * 2
    assert set(trainer.train_metrics) == {"loss", "accuracy", "top2_accuracy"}
    # Label smoothing 0.1 over 10 classes: targets are 0.91 (true class) and 0.01 (others).
    probs = tf.constant([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1] * 10])
    labels = tf.constant([0, 3])
    got = trainer.compute_loss(labels, probs).numpy()
    eps = 1e-7  # Keras clips probabilities to [eps, 1 - eps].
    clipped = np.clip(probs.numpy(), eps, 1 - eps)
    targets = np.full((2, 10), 0.01)
    targets[0, 0] = targets[1, 3] = 0.91
    expected = -(targets * np.log(clipped / clipped.sum(axis=1, keepdims=True))).sum(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_example_trains():
    proc = run_cli("--quick", script="examples/custom_trainer.py", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model: small_cnn" in proc.stdout
    epochs = re.findall(
        r"^epoch \d+/2 - step \d+ - loss ([\d.]+) .*top2_accuracy ([\d.]+) .*val_loss ([\d.]+)",
        proc.stdout, re.M)
    assert len(epochs) == 2, proc.stdout
    (loss1, _, val1), (loss2, top2, val2) = [tuple(map(float, e)) for e in epochs]
    assert loss2 < loss1 and val2 < val1
    assert 0.0 < top2 <= 1.0
    test_accuracy = float(re.search(r"^done: test accuracy ([\d.]+) after 56 steps$",
                                    proc.stdout, re.M).group(1))
    assert test_accuracy > 0.3  # 10 balanced classes: chance is 0.1; measured 0.71.


# ---------------------------------------------------------------- the autoencoder


def _data_page_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "data.md").read_text(), re.S)


def test_data_page_shows_the_autoencoder_verbatim():
    assert AUTOENCODER.read_text() in _data_page_blocks()


def test_autoencoder_model_loss_and_dtypes():
    module = _load_example(AUTOENCODER)
    trainer = module.AutoencoderTrainer(small_config(policy="mixed_bfloat16"))
    model = trainer.model
    assert model.name == "conv_autoencoder" and set(trainer.train_metrics) == {"loss"}
    convs = [l for l in model.layers if "conv" in type(l).__name__.lower()]
    assert [l.compute_dtype for l in convs] == ["bfloat16"] * 5
    assert all(w.dtype == tf.float32 for w in model.weights)
    # Images as targets: float32 pixels in [0, 1], the same ones the model sees as input.
    x, y = next(iter(trainer.datasets.train))
    assert y.dtype == tf.float32 and y.shape == x.shape == (32, 28, 28, 1)
    np.testing.assert_array_equal(x.numpy(), y.numpy())
    outputs = model(x, training=False)
    assert outputs.dtype == tf.float32 and outputs.shape == (32, 28, 28, 1)
    # Per-example MSE, checked against numpy in float64.
    loss = trainer.compute_loss(y, outputs).numpy()
    expected = ((outputs.numpy().astype(np.float64) - y.numpy()) ** 2).mean(axis=(1, 2, 3))
    assert loss.shape == (32,)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_autoencoder_trains():
    proc = run_cli("--quick", script="examples/autoencoder.py", timeout=300, env=EXAMPLE_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model: conv_autoencoder" in proc.stdout and "accuracy" not in proc.stdout
    epochs = re.findall(r"^epoch \d+/2 - step \d+ - loss ([\d.]+) - val_loss ([\d.]+) ",
                        proc.stdout, re.M)
    assert len(epochs) == 2, proc.stdout
    (loss1, val1), (loss2, val2) = [tuple(map(float, e)) for e in epochs]
    assert loss2 < loss1 and val2 < val1
    mse = float(re.search(r"^done: test reconstruction MSE ([\d.]+) after 56 steps$",
                          proc.stdout, re.M).group(1))
    # The same synthetic test images (seed 42): the MSE of predicting their mean image (the
    # best constant output) is the bar a reconstruction must clear; measured 0.0336 vs 0.045.
    x_test = data.load_arrays("synthetic", seed=42, synthetic_examples=1024).x_test
    pixels = x_test.astype(np.float64) / 255.0
    mean_image_mse = float(((pixels - pixels.mean(axis=0)) ** 2).mean())
    assert np.isfinite(mse) and 0 < mse < 0.9 * mean_image_mse, (mse, mean_image_mse)


# ---------------------------------------------------------------- from_arrays, as docs/data.md shows it


def test_data_page_from_arrays_script_runs_as_shown(tmp_path):
    script = [b for b in _data_page_blocks() if "data.from_arrays(x_train, y_train" in b
              and "trainer.TrainConfig(model=\"mlp\"" in b]
    assert len(script) == 1
    proc = subprocess.run([sys.executable, "-c", script[0]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **EXAMPLE_ENV))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1024 train / 0 validation / 256 test, batch 32, 32 steps per epoch" in proc.stdout
    accuracy = float(re.search(r"^test accuracy ([\d.]+) on my arrays$", proc.stdout,
                               re.M).group(1))
    assert accuracy > 0.9  # 10 classes: chance is 0.1; measured 1.000.
