"""The command line: bad input fails fast with one `error:` line; a good run writes its metrics.

Each case is a real ``python run.py`` subprocess (about 4 s of TensorFlow import each), so
all of them start together in a small pool when the module's first test asks for results.
"""

import concurrent.futures
import gzip
import importlib.util
import json
import os
import re

import pytest

from conftest import ROOT, run_cli, user_stderr_lines
from test_data import write_idx_folder

TINY = ["--dataset=synthetic", "--synthetic_examples=256", "--model_args=units=16",
        "--batch_size=32", "--epochs=1", "--steps_per_loop=4"]

# name -> (extra args, text the error line must contain). {missing}/{truncated}/{out} are
# filled in with temporary paths.
BAD_INPUT = {
    "policy": (["--policy=float16"], "unknown policy 'float16'"),
    "model": (["--policy=float32", "--model=resnet9000"], "unknown model 'resnet9000'"),
    "dataset": (["--policy=float32", "--dataset=cifar10"], "unknown dataset 'cifar10'"),
    "device": (["--policy=float32", "--device=tpu"], "unknown device 'tpu'"),
    "batch_size": (["--policy=float32", "--batch_size=0"], "--batch_size"),
    "loss_scale_negative": (["--policy=float32", "--loss_scale=-1"], "--loss_scale"),
    "loss_scale_text": (["--policy=float32", "--loss_scale=abc"], "'abc'"),
    "epochs": (["--policy=float32", "--epochs=-1"], "--epochs"),
    "model_args": (["--policy=float32", "--model_args=depth=3"], "takes no argument 'depth'"),
    "data_dir_absent": (["--policy=float32", "--dataset=fashion_mnist",
                         "--data_dir=/nonexistent/data"], "--data_dir"),
    "data_dir_missing_file": (["--policy=float32", "--dataset=fashion_mnist", "--data_dir={missing}",
                               "--metrics_file={out}/missing.json"],
                              "{missing}/t10k-labels-idx1-ubyte.gz is missing"),
    "data_dir_truncated_file": (["--policy=float32", "--dataset=fashion_mnist",
                                 "--data_dir={truncated}",
                                 "--metrics_file={out}/truncated.json"],
                                "{truncated}/train-images-idx3-ubyte.gz is truncated"),
    "hpu_without_bridge": (["--policy=mixed_bfloat16", "--device=hpu"], "habana-tensorflow"),
    "hpu_fp16": (["--policy=mixed_float16", "--device=hpu"], "mixed_float16"),
}
GOOD = ["--policy=mixed_bfloat16", "--dataset=synthetic", "--synthetic_examples=256",
        "--validation_split=0.25", "--batch_size=32", "--epochs=2", "--model_args=units=16",
        "--steps_per_loop=4", "--metrics_file={out}/metrics.json"]
GOOD_STEPS = 2 * ((256 - 64) // 32)  # epochs x steps per epoch = 12.

METRIC_KEYS = ("policy", "device", "model", "dataset", "epochs", "batch_size", "test_accuracy",
               "test_loss", "examples_per_sec", "step_time_ms", "loss_scale", "skipped_steps",
               "global_step", "weights_checksum")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    missing, truncated = root / "missing", root / "truncated"
    write_idx_folder(missing)
    os.remove(missing / "t10k-labels-idx1-ubyte.gz")
    write_idx_folder(truncated)
    images = truncated / "train-images-idx3-ubyte.gz"
    with gzip.open(images) as f:
        raw = f.read()
    with gzip.open(images, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return {"missing": str(missing), "truncated": str(truncated), "out": str(root / "out")}


@pytest.fixture(scope="module")
def results(paths):
    """Runs every case at once (4 at a time): name -> CompletedProcess."""
    jobs = {name: [a.format(**paths) for a in TINY + args] for name, (args, _) in BAD_INPUT.items()}
    jobs["good"] = [a.format(**paths) for a in GOOD]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_one_error_line(results, paths, name):
    if name == "hpu_without_bridge" and importlib.util.find_spec("habana_frameworks"):
        pytest.skip("Habana's bridge is installed here: --device=hpu is not bad input")
    proc = results[name]
    expected = BAD_INPUT[name][1].format(**paths)
    lines = user_stderr_lines(proc.stderr)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not re.search(r"^epoch ", proc.stdout, re.M)  # Failed before training.
    for arg in BAD_INPUT[name][0]:
        if arg.startswith("--metrics_file="):  # Nothing written for a run that never started.
            assert not os.path.exists(arg.split("=", 1)[1].format(**paths))


def test_good_run_prints_epochs_and_writes_metrics(results, paths):
    proc = results["good"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    epochs = re.findall(r"^epoch \d+/2 .*$", proc.stdout, re.M)
    assert len(epochs) == 2, proc.stdout
    for field in ("loss", "accuracy", "val_loss", "val_accuracy", "ms/step", "examples/s",
                  "loss_scale", "skipped"):
        assert re.search(rf"\b{re.escape(field)}\b", epochs[-1]), field
    assert re.search(r"^test: .*loss \d.*accuracy \d", proc.stdout, re.M)
    with open(os.path.join(paths["out"], "metrics.json")) as f:
        metrics = json.load(f)
    missing = [key for key in METRIC_KEYS if key not in metrics]
    assert not missing
    assert metrics["global_step"] == GOOD_STEPS
    assert (metrics["policy"], metrics["device"], metrics["model"], metrics["dataset"]) == (
        "mixed_bfloat16", "cpu", "mlp", "synthetic")
    assert metrics["epochs"] == 2 and metrics["batch_size"] == 32
    assert metrics["loss_scale"] == 2.0 ** 15 and metrics["skipped_steps"] == 0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert metrics["examples_per_sec"] > 0 and metrics["step_time_ms"] > 0
    assert isinstance(metrics["weights_checksum"], float)
    # The accuracy printed on the test line is the one in the file.
    printed = float(re.search(r"^test: .*accuracy (\d\.\d+)", proc.stdout, re.M).group(1))
    assert printed == pytest.approx(metrics["test_accuracy"], abs=5e-5)


def test_helpfull_documents_every_flag():
    source = (ROOT / "run.py").read_text()
    names = re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source)
    for required in ("policy", "device", "model", "dataset", "data_dir", "epochs", "batch_size",
                     "learning_rate", "optimizer", "loss_scale", "steps_per_loop",
                     "validation_split", "seed", "model_dir", "metrics_file"):
        assert required in names
    proc = run_cli("--helpfull", timeout=60)  # absl exits 1 after printing help.
    assert "Traceback" not in proc.stderr
    for name in names:
        match = re.search(rf"^\s+--(\[no\])?{name}: (.+)$", proc.stdout, re.M)
        assert match and len(match.group(2).strip()) > 5, name
