"""--export_dir: a SavedModel whose serving_default signature serves the trained weights.

The exported model is checked against the run itself, in a fresh process: its variables sum
to the run's ``weights_checksum``, and its predictions equal those of the same model built
anew and restored from the run's final checkpoint.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli, user_stderr_lines

from trainer.errors import UserError
from trainer.outputs import export

SMALL_RUN = ("--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32", "--epochs=1",
             "--validation_split=0", "--model_args=units=16", "--device=cpu")

# Runs in a fresh process: nothing of the training process (policy, graphs) is reused.
CHECK = r"""
import json, sys
import numpy as np
import tensorflow as tf
from trainer import data, registry
from trainer.core import precision
from trainer.compat import keras

export_dir, model_dir = sys.argv[1], sys.argv[2]
arrays = data.load_arrays("synthetic", seed=42, synthetic_examples=256)
images = data.to_float(tf.constant(arrays.x_test[:20])).numpy()
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
served = serve(images=tf.constant(images))["outputs"]

reader = tf.train.load_checkpoint(export_dir + "/variables/variables")
total = sum(float(np.sum(reader.get_tensor(name).astype(np.float64)))
            for name, _ in tf.train.list_variables(export_dir + "/variables/variables")
            if reader.get_variable_to_dtype_map()[name].is_floating)

with precision.policy_scope("mixed_bfloat16"):
    model = registry.build_model("mlp", input_shape=(28, 28, 1), num_classes=10,
                                 model_args={"units": 16})
path = tf.train.latest_checkpoint(model_dir + "/checkpoints")
tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
expected = tf.function(lambda t: model(t, training=False))(tf.constant(images)).numpy()
print(json.dumps({"dtype": served.dtype.name, "shape": served.shape.as_list(),
                  "served": served.numpy().tolist(), "expected": expected.tolist(),
                  "checksum": total, "input": str(serve.structured_input_signature)}))
"""


def test_export_serves_the_trained_weights(tmp_path):
    export_dir, model_dir, metrics = tmp_path / "export", tmp_path / "run", tmp_path / "m.json"
    result = run_cli(*SMALL_RUN, f"--export_dir={export_dir}", f"--model_dir={model_dir}",
                     f"--metrics_file={metrics}", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"exported SavedModel to {export_dir} (serving_default: images float32[?,28,28,1] -> "
            "outputs float32[?,10])") in result.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export")]  # Staging renamed.
    check = subprocess.run(
        [sys.executable, "-c", CHECK, str(export_dir), str(model_dir)], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    got = json.loads(check.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "float32" and got["shape"] == [20, 10]
    assert "shape=(None, 28, 28, 1), dtype=tf.float32" in got["input"]
    import numpy as np
    served, expected = np.array(got["served"]), np.array(got["expected"])
    np.testing.assert_allclose(served.sum(axis=1), 1.0, rtol=1e-5)  # Softmax probabilities.
    # Same weights, same bf16 math in a traced graph (eager execution rounds some bf16
    # products differently, by up to 0.4%): equal up to float32 rounding.
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    # The exported variables are the final trained weights, not initial or stale ones.
    checksum = json.loads(metrics.read_text())["weights_checksum"]
    assert got["checksum"] == pytest.approx(checksum, rel=1e-9, abs=1e-9)
    # The same command on the finished run, with a new folder: it exports without training.
    again = run_cli(*SMALL_RUN, f"--export_dir={tmp_path / 'again'}", f"--model_dir={model_dir}",
                    timeout=180)
    assert again.returncode == 0 and "nothing to train" in again.stdout, again.stderr[-2000:]
    assert _saved_checksum(tmp_path / "again") == pytest.approx(checksum, rel=1e-9, abs=1e-9)


def test_nonempty_export_dir_is_refused_before_training(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "saved_model.pb").write_bytes(b"an older model")
    result = run_cli(*SMALL_RUN, "--epochs=50", f"--export_dir={export_dir}", timeout=120)
    lines = user_stderr_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: --export_dir={export_dir} already holds files and exports "
                        "never overwrite; pass a new or empty folder (or remove that one)")
    assert "epoch" not in result.stdout  # Refused before any step.
    assert (export_dir / "saved_model.pb").read_bytes() == b"an older model"
    assert os.listdir(tmp_path) == ["export"]  # No staging folder left behind.


def test_check_export_dir_cases(tmp_path):
    export.check_export_dir(str(tmp_path / "new" / "model"))  # Missing: fine, made at the end.
    (tmp_path / "empty").mkdir()
    export.check_export_dir(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"is a file; pass a new folder"):
        export.check_export_dir(str(tmp_path / "file"))
    with pytest.raises(UserError, match=r"^cannot use --export_dir=.*: cannot create folders in"):
        export.check_export_dir(str(tmp_path / "file" / "model"))  # Under a file.
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "new"]


# Two workers train a from_arrays Trainer and export: the arrays are sharded like the built-in
# synthetic dataset (same weights as one process), every worker joins the save (a collective),
# and only the chief's SavedModel is kept.
TWO_WORKER_SCRIPT = """
import sys
import trainer
from trainer import data


class ArraysTrainer(trainer.Trainer):
    def build_datasets(self):
        c = self.config
        a = data.load_arrays("synthetic", seed=c.seed, synthetic_examples=c.synthetic_examples)
        return data.from_arrays(a.x_train, a.y_train, a.x_test, a.y_test, num_classes=10,
                                batch_size=c.batch_size, validation_split=c.validation_split,
                                seed=c.seed, source="synthetic arrays")


config = trainer.TrainConfig(
    dataset="synthetic", synthetic_examples=1024, model_args={"units": 16}, epochs=1,
    batch_size=64, policy="float32", device="cpu", progress="none", seed=3,
    distribution="multi_worker", export_dir=sys.argv[1], metrics_file=sys.argv[2])
trainer.run(config, trainer_cls=ArraysTrainer)
"""


def _saved_checksum(export_dir) -> float:
    from trainer.compat import tf
    prefix = str(export_dir / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    return sum(float(reader.get_tensor(name).astype("float64").sum())
               for name in dtypes if dtypes[name].is_floating)


def test_two_workers_export_once_from_arrays_sharded_like_built_in(tmp_path):
    single = tmp_path / "single.json"
    reference = run_cli("--dataset=synthetic", "--synthetic_examples=1024",
                        "--model_args=units=16", "--epochs=1", "--batch_size=64",
                        "--policy=float32", "--device=cpu", "--progress=none", "--seed=3",
                        "--distribution=none", f"--metrics_file={single}", timeout=180)
    assert reference.returncode == 0, reference.stderr[-2000:]
    script, scratch = tmp_path / "arrays_job.py", tmp_path / "tmp"
    script.write_text(TWO_WORKER_SCRIPT)
    scratch.mkdir()
    export_dir, metrics = tmp_path / "export", tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", str(script),
         str(export_dir), str(metrics)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(scratch),
                 TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-3000:]
    checksums = re.findall(r"worker (\d)/2[^:]*: global_step 14 weights_checksum (\S+)",
                           result.stdout)
    assert sorted(i for i, _ in checksums) == ["0", "1"], result.stdout[-3000:]
    assert len({c for _, c in checksums}) == 1  # Both replicas hold the same weights.
    chief = json.loads(metrics.read_text())
    assert chief["data_source"] == "synthetic arrays" and chief["num_workers"] == 2
    assert chief["weights_checksum"] == pytest.approx(
        json.loads(single.read_text())["weights_checksum"], rel=1e-5)
    assert result.stdout.count("exported SavedModel to") == 1  # The chief says so, once.
    assert _saved_checksum(export_dir) == pytest.approx(chief["weights_checksum"], rel=1e-9)
    # The non-chief's copy went to a scratch folder and was deleted; nothing else is left.
    assert not [p for p in os.listdir(scratch) if p.startswith("worker-export-")]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["single.json", "arrays_job.py", "tmp", "export", "metrics.json"])
