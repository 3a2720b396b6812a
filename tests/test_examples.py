"""The README's subclass example: it is the file in examples/, its loss is right, and it trains."""

import importlib.util
import re

import numpy as np

from conftest import ROOT, run_cli, small_config
from trainer.compat import mixed_precision, tf

EXAMPLE = ROOT / "examples" / "custom_trainer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_trainer_example", EXAMPLE)
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
