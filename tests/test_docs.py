"""Every command README.md and docs/ show runs as written (small sizes via extra flags only).

A command in a shell block is either run here, or listed in ELSEWHERE / NOT_RUN with the
reason; a new command in the docs that is neither fails ``test_every_command_is_accounted_for``.
Each page's commands run in order in one scratch folder (``runs/...`` lands there), beside
links to run.py, configs/ and the venv, so later commands see what earlier ones wrote.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
COMMAND_WORDS = ("python", "python3", "mpirun", "make", "source", "saved_model_cli",
                 "tensorboard", "pip", "mptrain", ".venv/bin/python")
# Appended to every run.py command: a small synthetic dataset, one epoch.
SMALL = ("--dataset=synthetic", "--synthetic_examples=512", "--batch_size=64", "--epochs=1")
# Extra sizes a command needs on top of SMALL (a profile range needs 120 steps).
MORE = {"--profile_steps=100,120": ("--synthetic_examples=8192",)}
# Record-file runs keep their --dataset: only the sizes; their shards are written small.
SMALL_RECORDS = ("--batch_size=16", "--epochs=1")
SMALL_SHARDS = ("--examples=512",)  # Appended to `write_shards --dataset=...`.
# Run by another test, with its own checks of the output.
ELSEWHERE = {
    "make test": ".ci/run: this suite is what it runs",
    "python -m trainer.launch": "tests/test_lockstep.py runs the docs' launcher commands",
    "mpirun -np 2 python run.py": "tests/test_lockstep.py runs the docs' mpirun commands",
}
# Cannot run here.
NOT_RUN = {
    "--device=hpu": "needs Gaudi cards",
    "tensorboard --logdir": "a server that runs until stopped (the event files it reads are "
                            "checked by tests/test_fit_loop.py and tests/test_profiling.py)",
    "pip install": "installs packages",
    "/data/imagenet": "needs ImageNet's shards",
}
# What a successful run prints (stdout), per command fragment: more than a zero exit status.
EXPECT = {
    "--audit": r"^audit OK: model .cnn. under mixed_bfloat16",
    "--numerics": r"^numerics (OK|FLAGGED): model .cnn. under mixed_bfloat16",
    "--compare_policies": r"^wrote runs/cmp/comparison.json",
    "--dry_run": r"^policy auto: would train (float32|mixed_bfloat16|mixed_float16) ",
    "configs/compare_": r"^wrote runs/compare_\w+/comparison.json",
    "saved_model_cli": r"serving_default|outputs\['",
    "write_shards": r"^wrote \d+ files \([\d.]+ MB\)",
    # The run really is Keras 2 (the banner names it), then trains to its test line.
    "TF_USE_LEGACY_KERAS=1": r"\| Keras 2\.[\d.]+ \(tf_keras\)$(.|\n)*^test: loss [\d.]+",
    "run.py": r"^test: loss [\d.]+",
}
# Leading environment assignments (`TF_USE_LEGACY_KERAS=1 python run.py ...`) run as written.
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


# The pages' own ```python blocks (the examples/ files and the from_arrays script are run by
# tests/test_examples.py): saved under a name, run after the page's shell commands, in the
# same folder, with the arguments the page gives, then checked.
PYTHON_BLOCKS = {
    "docs/extending.md": ("my_models.py", ("--model=wide_mlp", "--model_args=units=512", *SMALL),
                          r"^model: wide_mlp|\| model: wide_mlp \("),
    "docs/outputs.md": ("serve.py", (), None),
}
# Appended to serve.py's run: what the block computed.
SERVE_CHECK = ("assert probabilities.shape == (4, 10) and probabilities.dtype == tf.float32; "
               "np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5); "
               "print('served', probabilities.shape)")


def _photos(folder, per_class: int = 24) -> None:
    """A folder of JPEGs, one sub-folder per class, as a user's photos are kept."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog", "fox")):
        os.makedirs(folder / name)
        for i in range(per_class):
            pixels = np.clip(rng.normal(70 * label + 40, 25, (48, 64, 3)), 0, 255)
            jpeg = tf.io.encode_jpeg(pixels.astype(np.uint8)).numpy()
            (folder / name / f"{i}.jpg").write_bytes(jpeg)


def _python_block(page: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    (block,) = [b for b in blocks if first_line in b]
    return block


def _commands(page: str) -> list:
    text = (ROOT / page).read_text()
    found = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang not in ("", "bash", "sh", "shell"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"\s+", " ", line)
            if ENV_PREFIX.sub("", line).split(" ")[0] in COMMAND_WORDS:
                found.append(line)
    return found


def _reason_not_run(command: str):
    for table in (ELSEWHERE, NOT_RUN):
        for fragment, reason in table.items():
            if fragment in command:
                return reason
    return None


def test_every_command_is_accounted_for():
    commands = [c for page in PAGES for c in _commands(page)]
    assert len(commands) >= 15, commands  # The parser still finds the docs' commands.
    assert any(c.startswith("make run") for c in commands)
    for command in commands:
        runnable = ENV_PREFIX.sub("", command).startswith((
            "python run.py", "source .venv/bin/activate && python", "make run",
            "saved_model_cli", "python -m trainer.data.write_shards"))
        assert runnable or _reason_not_run(command), f"neither run nor explained: {command}"


def _runnable(command: str) -> str:
    """The shell line to run: the command as written, small sizes appended to run.py calls."""
    if command.startswith("make run"):
        return f"make --no-print-directory run ARGS='{' '.join(SMALL)}'"
    if "write_shards --dataset=" in command:
        return f"{command} {' '.join(SMALL_SHARDS)}"
    if "run.py" not in command:
        return command
    if "tfrecord:" in command:
        return f"{command} {' '.join(SMALL_RECORDS)}"
    # `python` is the venv's: its bin folder leads PATH (see the test below).
    extra = list(SMALL) + [flag for key, more in MORE.items() if key in command for flag in more]
    return f"{command} {' '.join(extra)}"


def _runnable_commands(page: str) -> list:
    return [c for c in _commands(page) if _reason_not_run(c) is None]


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable_commands(p) or p in PYTHON_BLOCKS])
def test_page_commands_run_as_written(page, tmp_path):
    commands = _runnable_commands(page)
    for name in ("run.py", "configs", "examples", ".venv"):
        os.symlink(ROOT / name, tmp_path / name)
    if any("--images=photos/" in c for c in commands):
        _photos(tmp_path / "photos")
    # As after `source .venv/bin/activate`: the venv's commands (saved_model_cli...) first.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    for command in commands:
        line = _runnable(command)
        cwd = ROOT if command.startswith("make ") else tmp_path
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{page}: {line}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        # The first fragment the command holds; "run.py" last, for every other training run.
        pattern = next(p for key, p in EXPECT.items() if key in command or key == "run.py")
        assert re.search(pattern, proc.stdout, re.M), f"{page}: {line}\n{proc.stdout[-2000:]}"
    if page in PYTHON_BLOCKS:
        name, args, pattern = PYTHON_BLOCKS[page]
        first = {"my_models.py": "# my_models.py", "serve.py": "tf.saved_model.load"}[name]
        (tmp_path / name).write_text(_python_block(page, first))
        if name == "serve.py":
            argv = [sys.executable, "-c", f"exec(open('serve.py').read()); {SERVE_CHECK}"]
        else:
            argv = [sys.executable, name, *args]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{page}: {name}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        assert re.search(pattern or r"^served \(4, 10\)$", proc.stdout, re.M), proc.stdout[-2000:]
