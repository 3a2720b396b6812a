"""The command line: bad input fails fast with one `error:` line; a good run writes its metrics.

Each case is a real ``python run.py`` subprocess (about 4 s of TensorFlow import each), so
all of them start together in a small pool when the module's first test asks for results.
"""

import concurrent.futures
import dataclasses
import gzip
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from absl import flags
from conftest import ROOT, run_cli, user_stderr_lines
from test_data import write_idx_folder

from trainer import registry
from trainer.cli import config_flags as trainer_flags
from trainer.compat import tf
from trainer.config import (DEVICES, DISTRIBUTIONS, OPTIMIZERS, POLICY_SETTINGS, PROGRESS,
                            SCHEDULES, TrainConfig)

# --device=cpu: where Habana's bridge is installed (the TF 2.15 lane) 'auto' adds a warning
# line; the cases about devices give their own --device after it, which wins.
TINY = ["--dataset=synthetic", "--synthetic_examples=256", "--model_args=units=16",
        "--batch_size=32", "--epochs=1", "--steps_per_loop=4", "--device=cpu"]

# name -> (extra args, text the error line must contain). {missing}/{truncated}/{out} are
# filled in with temporary paths.
BAD_INPUT = {
    # Enum flags: absl's parser refuses the value before TensorFlow starts.
    "policy": (["--policy=float16"], "--policy=float16: value should be one of <float32|"),
    "model": (["--policy=float32", "--model=resnet9000"], "unknown model 'resnet9000'"),
    "dataset": (["--policy=float32", "--dataset=cifar10"], "unknown dataset 'cifar10'"),
    "device": (["--policy=float32", "--device=tpu"], "--device=tpu: value should be one of"),
    "profile_steps": (["--profile_steps=3,1", "--model_dir={out}/profile"],
                      "profile_steps must be START,END with integers 0 <= START < END"),
    "profile_steps_no_model_dir": (["--profile_steps=1,3"], "pass --model_dir"),
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


# A value unlike the default for each flag that needs more than "flip it / add one"; the
# value the config holds when the flag text is parsed differently (model_args, loss_scale).
NON_DEFAULT = {
    "policy": "float32", "device": "cpu", "model": "cnn", "model_args": "units=7",
    "dataset": "mnist", "data_dir": "{tmp}", "optimizer": "sgd", "loss_scale": "1024",
    "model_dir": "{tmp}/run", "metrics_file": "{tmp}/m.json", "best_metric": "loss",
    "lr_schedule": "cosine", "progress": "log", "compare_policies": "float32",
    "export_dir": "{tmp}/export", "profile_steps": "1,2", "distribution": "none",
    "worker_hosts": "a,b", "learning_rate": 0.5, "validation_split": 0.2, "clip_norm": 1.5,
    "grad_accum_steps": 2, "eval_data": "{tmp}/validation-*",
}
IN_CONFIG = {"model_args": {"units": 7}, "loss_scale": 1024.0}
NOT_FLAGS = {"verbose"}  # Library callers' switch; run.py always prints.


def test_every_config_field_is_a_flag_and_reaches_the_config(tmp_path):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(trainer_flags.flag_names()) == set(fields) - NOT_FLAGS
    flag_values = flags.FlagValues()
    trainer_flags.define_flags(flag_values)
    flag_values(["run.py"])
    assert trainer_flags.config_from_flags(flag_values) == TrainConfig()  # Same defaults.
    for name in trainer_flags.flag_names():
        default = getattr(TrainConfig(), name)
        value = NON_DEFAULT.get(name)
        if value is None:
            value = (not default) if isinstance(default, bool) else default + 1
        text = value.format(tmp=tmp_path) if isinstance(value, str) else value
        argv = ["run.py", f"--{name}={text}"]
        if name in ("checkpoint_every", "profile_steps", "numerics_every", "recover_trials"):
            argv.append(f"--model_dir={tmp_path}/run")  # They need a folder to write into.
        if name in ("eval_data", "image_size", "num_classes", "label_offset", "augment",
                    "parallel_calls"):
            argv.append(f"--dataset=tfrecord:{tmp_path}/train-*")  # Only for record files.
        if name == "dry_run":
            argv.append("--policy=auto")  # It shows the decision of --policy=auto.
        flag_values.unparse_flags()
        flag_values(argv)
        config = trainer_flags.config_from_flags(flag_values)
        expected = IN_CONFIG.get(name, text)
        assert getattr(config, name) == expected != default, name
        assert flag_values[name].help and len(flag_values[name].help) > 10, name


def test_enum_flags_come_from_the_config_lists():
    flag_values = flags.FlagValues()
    trainer_flags.define_flags(flag_values)
    for name, choices in (("policy", POLICY_SETTINGS), ("device", DEVICES), ("optimizer", OPTIMIZERS),
                          ("lr_schedule", SCHEDULES), ("distribution", DISTRIBUTIONS),
                          ("progress", PROGRESS)):
        assert flag_values[name].parser.enum_values == list(choices), name
    # Open registries stay text, checked by TrainConfig: models registered by user code,
    # datasets of trainer/data/__init__.py and tfds:NAME.
    assert not hasattr(flag_values["model"].parser, "enum_values")
    assert not hasattr(flag_values["dataset"].parser, "enum_values")
    flag_values(["run.py", "--dataset=tfds:mnist/3.0.1"])
    assert trainer_flags.config_from_flags(flag_values).dataset == "tfds:mnist/3.0.1"


def test_help_lists_models_with_their_arguments():
    proc = run_cli("--help", timeout=120)  # absl exits 1 after printing help.
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stdout.split())  # absl wraps help text at 80 columns.
    assert "mlp: units=256" in text
    for name in registry.model_names():
        params = inspect.signature(registry.get_model_builder(name)).parameters.values()
        # As --model_args spells them: booleans are true/false.
        shown = ",".join(
            f"{p.name}={str(p.default).lower() if isinstance(p.default, bool) else p.default}"
            for p in params if p.name not in ("input_shape", "num_classes"))
        assert f"{name}: {shown}" in text, name
    assert "fashion_mnist, mnist, synthetic, tfds:NAME[/CONFIG]" in text
    assert "--policy: <float32|mixed_bfloat16|mixed_float16|auto>" in text
    for name in trainer_flags.flag_names():  # --help (not only --helpfull) shows every flag.
        assert re.search(rf"^\s+--(\[no\])?{name}: ", proc.stdout, re.M), name


# Our lines: the banner, data, epoch and test lines, and our own warnings (nothing from
# TensorFlow's C++ start-up).
OUR_LINES = re.compile(r"^(device: |policy: |data: |epoch \d+/\d+ - |test: |warning: |note: )")
# A TensorFlow C++ INFO line: TF 2.21's absl format, or TF 2.15's.
TF_INFO_LINE = re.compile(r"^(I\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: I )\S+:\d+\] ",
                          re.M)
QUIET_ARGS = ["--dataset=synthetic", "--synthetic_examples=256", "--epochs=1", "--batch_size=32",
              "--validation_split=0", "--model_args=units=16"]


def tf_version():
    return tuple(int(part) for part in tf.__version__.split(".")[:2])


def _run_plain(*args):
    """run.py as a user runs it: no TF_CPP_MIN_LOG_LEVEL from the test environment."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    tf_version() < (2, 16), reason="TF 2.15's XLA prints 'Compiled cluster using XLA!' through "
    "absl's uninitialised log at the first compiled step, past start-up (see README)")
def test_start_up_is_quiet_unless_verbose():
    proc = _run_plain(*QUIET_ARGS)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not OUR_LINES.match(line)] == []
    assert len([line for line in lines if line.startswith("epoch 1/1 - step 8 ")]) == 1
    verbose = _run_plain(*QUIET_ARGS, "--verbosity=1")
    assert verbose.returncode == 0, verbose.stderr
    # TensorFlow's C++ log is back (e.g. the oneDNN notice or CUDA probing, INFO lines).
    assert TF_INFO_LINE.search(verbose.stderr), verbose.stderr


def test_installed_package_imports_from_any_folder(tmp_path):
    # A user's project with its own `models` package: the zoo is trainer.models, found
    # through the registry's table, so this one neither shadows it nor gets imported.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('user models imported')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import trainer, trainer.cli.main; from trainer import registry; "
         "print(trainer.__file__); print(registry.model_names()); "
         "print(trainer.data.from_arrays.__module__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr  # `make setup` installs it (pip install -e .).
    assert proc.stdout.split("\n")[:3] == [
        str(ROOT / "trainer" / "__init__.py"), "['cnn', 'mlp', 'resnet', 'transformer']",
        "trainer.data"]
    # The console script is the same command as run.py: a bad value, one line, no TensorFlow.
    script = os.path.join(os.path.dirname(sys.executable), "mptrain")
    bad = subprocess.run([script, "--policy=float16"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "error: flag --policy=float16: value should be one of "
        "<float32|mixed_bfloat16|mixed_float16|auto>; see --helpfull for the flags"]


def test_a_built_wheel_holds_every_subpackage_and_imports(tmp_path):
    """A non-editable install: the wheel of pyproject.toml, installed into a folder of its own."""
    source = tmp_path / "source"  # setuptools builds in the source tree: not in the checkout.
    shutil.copytree(ROOT / "trainer", source / "trainer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("mptrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.endswith(".py")}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "trainer").rglob("*.py")}
    assert packaged == sources  # Every module of every subpackage, and nothing at the top.
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-c", "import trainer; print(trainer.__file__); "
         "print(trainer.data.from_arrays.__module__, trainer.Trainer.__module__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(site / "trainer" / "__init__.py"), "trainer.data",
                                   "trainer.core.steps"]
