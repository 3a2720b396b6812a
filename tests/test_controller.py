"""The Controller and periodic actions: *when* step loops end and actions run (no TF work)."""

from __future__ import annotations

import pytest

from trainer.compat import tf
from trainer.loop.actions import PeriodicAction
from trainer.loop.controller import Controller


class _FakeTrainer:
    """Counts steps like a Trainer, without TensorFlow work."""

    def __init__(self):
        self.global_step = tf.Variable(0, dtype=tf.int64)
        self.loops = []

    def train_steps(self, n):
        self.loops.append(n)
        self.global_step.assign_add(n)


def test_controller_ends_loops_on_action_boundaries():
    trainer, seen = _FakeTrainer(), []
    actions = [PeriodicAction(lambda step, now: seen.append(("ckpt", step)), every_steps=25),
               PeriodicAction(lambda step, now: seen.append(("eval", step)), every_steps=40)]
    controller = Controller(trainer=trainer, total_steps=100, steps_per_loop=30,
                                 actions=actions, clock=lambda: 0.0)
    assert controller.run()
    assert sum(trainer.loops) == 100
    assert max(trainer.loops) <= 30
    assert [s for kind, s in seen if kind == "ckpt"] == [25, 50, 75, 100]
    assert [s for kind, s in seen if kind == "eval"] == [40, 80]


def test_controller_stops_when_asked_and_resumes_from_the_step():
    trainer = _FakeTrainer()
    calls = []
    controller = Controller(trainer=trainer, total_steps=50, steps_per_loop=10,
                                 should_stop=lambda: len(trainer.loops) == 2,
                                 actions=[PeriodicAction(lambda s, n: calls.append(s))])
    assert controller.run() is False
    assert int(trainer.global_step.numpy()) == 20 and calls == [10, 20]
    assert Controller(trainer=trainer, total_steps=50, steps_per_loop=10).run()
    assert int(trainer.global_step.numpy()) == 50


def test_controller_refuses_to_spin_on_a_loop_that_runs_no_step():
    class Stuck(_FakeTrainer):
        def train_steps(self, n):  # Its stop condition holds already: no step runs.
            self.loops.append(n)

    trainer, checked = Stuck(), []
    controller = Controller(trainer=trainer, total_steps=50, steps_per_loop=10,
                                 after_loop=checked.append)
    with pytest.raises(RuntimeError, match="ran none at step 0"):
        controller.run()
    assert trainer.loops == [10] and checked == [0]  # after_loop had its chance to explain.


def test_time_based_action_uses_the_injected_clock():
    ran = []
    action = PeriodicAction(lambda step, now: ran.append((step, now)), every_secs=10)
    for step, now in [(1, 100.0), (2, 105.0), (3, 110.0), (4, 115.0), (5, 120.5)]:
        action(step, now)
    assert ran == [(3, 110.0), (5, 120.5)]
    assert action(6, 121.0, force=True) and ran[-1] == (6, 121.0)
