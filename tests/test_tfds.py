"""--dataset=tfds:NAME: prepared TensorFlow Datasets read into memory, never downloaded.

Data comes from ``tfds.testing.mock_data``, which replaces what a prepared folder would hold
(random images and labels of the real builder's features) without network or files; the
"not prepared" cases use the real builder on an empty folder. The TF 2.15 stack has no
tensorflow-datasets: there the flag fails with one line (checked with that interpreter).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli, user_stderr_lines

from trainer import data
from trainer.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
PY215 = ROOT / ".venv-tf215" / "bin" / "python"


def test_mock_mnist_loads_like_fashion_mnist(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        arrays = data.load_arrays("tfds:mnist", data_dir=str(tmp_path))
        builder_dir = tfds.builder("mnist", data_dir=str(tmp_path)).data_dir
    assert arrays.x_train.shape == (48, 28, 28, 1) and arrays.x_test.shape == (48, 28, 28, 1)
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int32
    assert arrays.num_classes == 10 and 0 <= arrays.y_train.min() and arrays.y_train.max() < 10
    assert arrays.source == builder_dir
    ds = data.make_datasets(arrays, batch_size=16, validation_split=0.0, seed=1)
    # Same pipeline as the built-in datasets: uint8 scaled to [0, 1], exact resume.
    x, y = next(iter(ds.train_from(16)))
    order = ds.in_memory.order(0).numpy()[16:32]
    np.testing.assert_array_equal(y.numpy(), arrays.y_train[order])
    np.testing.assert_allclose(x.numpy(), arrays.x_train[order] / 255.0, rtol=1e-6)


def test_audit_shapes_come_from_the_builder_info(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        assert data.dataset_shapes("tfds:mnist", str(tmp_path)) == ((28, 28, 1), 10)
    assert data.dataset_shapes("synthetic") == ((28, 28, 1), 10)


def test_not_prepared_names_folder_and_fix(tmp_path):
    with pytest.raises(UserError) as info:
        data.load_arrays("tfds:mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"--dataset=tfds:mnist is not prepared in {tmp_path} "
                              f"({tmp_path / 'mnist'}")
    assert f"tfds build mnist --data_dir={tmp_path}" in message and "\n" not in message
    assert os.listdir(tmp_path) == []  # Nothing downloaded or created.


@pytest.mark.parametrize("name, expected", [
    ("tfds:no_such_dataset", "--dataset=tfds:no_such_dataset: Dataset no_such_dataset not found"),
    ("tfds:mnist/no_such_config", "--dataset=tfds:mnist/no_such_config: "),
])
def test_unknown_names_are_one_line(tmp_path, name, expected):
    with pytest.raises(UserError) as info:
        data.load_arrays(name, data_dir=str(tmp_path))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


# Runs run.py's main under mock_data in a fresh process: the CLI path, banner and metrics file.
MOCK_RUN = """
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = ["run.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=96):
    runpy.run_path("run.py", run_name="__main__")
"""


def test_cli_trains_on_a_tfds_dataset(tmp_path):
    metrics = tmp_path / "m.json"
    result = subprocess.run(
        [sys.executable, "-c", MOCK_RUN, "--dataset=tfds:mnist", f"--data_dir={tmp_path}",
         "--batch_size=32", "--epochs=2", "--validation_split=0.25", "--model_args=units=16",
         "--device=cpu", "--progress=log", f"--metrics_file={metrics}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(metrics.read_text())
    source = summary["data_source"]
    assert summary["dataset"] == "tfds:mnist" and source.endswith(os.path.join("mnist", "3.0.1"))
    assert (f"data: tfds:mnist from {source}: 72 train / 24 validation / 96 test, batch 32, "
            "2 steps per epoch") in result.stdout
    assert summary["global_step"] == 4 and np.isfinite(summary["test_loss"])


def test_cli_not_prepared_is_one_error_line(tmp_path):
    result = run_cli("--dataset=tfds:mnist", f"--data_dir={tmp_path}", "--device=cpu",
                     timeout=120)
    lines = user_stderr_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --dataset=tfds:mnist is not prepared in {tmp_path} ")


@pytest.mark.skipif(not PY215.exists(), reason="the TF 2.15 venv (.venv-tf215) is not set up")
def test_tf215_stack_without_tfds_is_one_error_line(tmp_path):
    # TF_USE_LEGACY_KERAS (set by trainer.compat in this process for tf_keras) would make TF
    # 2.15 look for tf_keras, which that stack does not have: its built-in tf.keras is Keras 2.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run(
        [str(PY215), "run.py", "--dataset=tfds:mnist", f"--data_dir={tmp_path}",
         "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    lines = user_stderr_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --dataset=tfds:mnist reads TensorFlow Datasets, but "
                               "tensorflow-datasets is not installed")


def test_images_of_varying_size_are_refused_in_one_line(tmp_path):
    # tf_flowers' images have shape (None, None, 3): the builder's info says so, no data needed.
    with pytest.raises(UserError, match=r"^--dataset=tfds:tf_flowers: its 'image' feature has "
                                        r"shape \(None, None, 3\), not one fixed shape; resize"):
        data.dataset_shapes("tfds:tf_flowers", str(tmp_path))


def test_a_set_too_big_for_memory_streams_from_its_prepared_files(tmp_path, monkeypatch):
    # A real prepared set (tfds writes its TFRecord files and dataset_info.json here), with
    # the line between memory and streaming set to 0 MB: trained from the files, never
    # loaded whole, and the same examples as the in-memory path of the same set.
    import trainer
    from trainer import data
    from trainer.config import TrainConfig
    from trainer.data import tfds_source

    class TinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(96, 0), "test": self._generate_examples(32, 1)}

        def _generate_examples(self, count, seed):
            rng = np.random.default_rng(seed)
            for i in range(count):
                label = i % 3
                image = (rng.integers(0, 30, (8, 8, 1)) + 100 * label).astype(np.uint8)
                yield i, {"image": image, "label": label}

    TinyDigits(data_dir=str(tmp_path)).download_and_prepare()
    # 30 steps: after 9 (units 16, learning rate 0.01) a run gave 0.31-0.63 over seeds 0-5,
    # two brightness levels merged; these settings gave 0.94-1.0 over the same seeds.
    config = TrainConfig(dataset="tfds:tiny_digits", data_dir=str(tmp_path), batch_size=32,
                         epochs=10, validation_split=0, model_args={"units": 64}, device="cpu",
                         policy="float32", learning_rate=0.03, verbose=False)
    assert not tfds_source.streams(config.dataset, config.data_dir)  # 6 KB: in memory.
    monkeypatch.setenv(tfds_source.STREAM_ABOVE_ENV, "0")
    assert tfds_source.streams(config.dataset, config.data_dir)
    streamed = data.load(config)
    assert streamed.sharded and streamed.in_memory is None and streamed.steps_per_epoch == 3
    assert (streamed.num_test, streamed.input_shape, streamed.num_classes) == (32, (8, 8, 1), 3)
    seen = np.concatenate([x.numpy() for x, _ in streamed.train.take(3)])
    memory = data.load_arrays("tfds:tiny_digits", data_dir=str(tmp_path))
    np.testing.assert_allclose(np.sort(seen.reshape(96, -1).sum(1)),  # The same examples.
                               np.sort((memory.x_train / 255).reshape(96, -1).sum(1)), rtol=1e-5)
    summary = trainer.run(config)
    assert summary["global_step"] == 30 and summary["test_accuracy"] > 0.6
    assert summary["data_source"] == os.path.join(str(tmp_path), "tiny_digits", "1.0.0")
