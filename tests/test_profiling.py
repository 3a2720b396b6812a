"""--profile_steps: loops break at START and END, the chief traces exactly those steps."""

import collections
import glob
import os

import pytest
from conftest import run_cli, user_stderr_lines

from trainer.config import TrainConfig, parse_profile_steps
from trainer.errors import ConfigError
from trainer.loop.controller import Controller
from trainer.loop.profiling import StepProfiler


@pytest.mark.parametrize("text", ["3,1", "2,2", "-1,3", "1", "1,2,3", "a,b", "1.5,3", ""])
def test_bad_ranges_refused_with_one_line(text):
    if text == "":
        assert TrainConfig(profile_steps="").profile_steps == ""  # Off.
        return
    with pytest.raises(ConfigError) as info:
        TrainConfig(profile_steps=text, model_dir="/tmp/x")
    assert "--profile_steps" in str(info.value) and "\n" not in str(info.value)


def test_needs_a_model_dir():
    with pytest.raises(ConfigError, match="pass --model_dir"):
        TrainConfig(profile_steps="1,3")
    assert parse_profile_steps(" 0, 10 ") == (0, 10)


class FakeTrainer:
    """Counts steps like Trainer.train_steps; records each compiled loop's (start, size)."""

    def __init__(self):
        self.step, self.loops = 0, []

    @property
    def global_step(self):
        return self

    def numpy(self):
        return self.step

    def train_steps(self, n):
        self.loops.append((self.step, n))
        self.step += n


@pytest.mark.parametrize("start, end, resume_at, traced", [
    (3, 7, 0, [(3, 4)]),               # One loop of exactly steps 4..7.
    (0, 12, 0, [(0, 5), (5, 5), (10, 2)]),  # From the first step: started before any loop.
    (5, 20, 8, [(8, 5), (13, 5), (18, 2)]),  # Resumed inside the range: traced from there.
    (2, 4, 10, []),                    # Resumed after the range: nothing.
])
def test_loops_break_at_the_range_and_trace_only_it(start, end, resume_at, traced):
    trainer = FakeTrainer()
    trainer.step = resume_at
    profiler = StepProfiler(start, end, "", enabled=False, step=resume_at)
    seen = []
    original = trainer.train_steps

    def train_steps(n):
        if profiler.running:
            seen.append((trainer.step, n))
        original(n)

    trainer.train_steps = train_steps
    Controller(trainer=trainer, total_steps=23, steps_per_loop=5,
                    actions=profiler.actions).run()
    profiler.stop()
    assert seen == traced
    assert trainer.step == 23 and not profiler.running


def test_cli_writes_a_trace_of_exactly_the_range(tmp_path):
    proc = run_cli("--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
                   "--model_args=units=16", "--epochs=1", "--validation_split=0",
                   "--steps_per_loop=1", "--profile_steps=1,3", f"--model_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert user_stderr_lines(proc.stderr) == []
    assert "epoch 1/1 - step 8 " in proc.stdout  # Training itself is unchanged.
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))
    assert len(traces) == 1
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(traces[0], "rb") as f:
        space.ParseFromString(f.read())
    calls = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            calls.update(names.get(event.metadata_id) for event in line.events)
    assert calls["_train_loop_fn"] == 2  # Steps 2 and 3, one-step loops: not 1..8.
