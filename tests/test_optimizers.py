"""trainer/optimizers.py: the fused optimizer update changes speed, not results."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import small_config
from trainer.compat import tf
from trainer.trainer import Trainer


def _train(config, update: str):
    trainer = Trainer(config)
    if update != "whole_step":  # Before the first call traces the step.
        trainer.loss_scaler.apply_fn = None
        trainer.loss_scaler.inner_optimizer.jit_compile = update == "per_variable"
    trainer.train_steps(3)
    trainer.train_steps(4)
    return trainer


@pytest.mark.parametrize("policy, optimizer, schedule", [
    ("float32", "adamw", "cosine"), ("mixed_bfloat16", "adam", "constant"),
    ("mixed_float16", "momentum", "constant"), ("float32", "rmsprop", "constant")])
def test_whole_step_update_equals_per_variable_and_unfused(policy, optimizer, schedule):
    config = small_config(policy=policy, optimizer=optimizer, lr_schedule=schedule,
                          warmup_steps=2, deterministic=True)
    runs = {update: _train(config, update)
            for update in ("whole_step", "per_variable", "unfused")}
    assert runs["whole_step"].loss_scaler.apply_fn is not None  # The default here.
    reference = [w.numpy() for w in runs["unfused"].model.weights]
    for update in ("whole_step", "per_variable"):
        trainer = runs[update]
        assert int(trainer.global_step.numpy()) == 7
        assert trainer.loss_scale == runs["unfused"].loss_scale
        for got, want in zip(trainer.model.weights, reference):
            # XLA may contract a multiply-add into one FMA: equal up to float rounding.
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-7)
    whole, per_variable = (runs[u].model.weights for u in ("whole_step", "per_variable"))
    for a, b in zip(whole, per_variable):  # Both compiled by XLA: the very same floats.
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_whole_step_update_skips_non_finite_steps():
    trainer = Trainer(small_config(policy="mixed_float16", loss_scale="dynamic"))
    before = [w.numpy() for w in trainer.model.weights]
    kernel = trainer.model.trainable_variables[0]
    kernel.assign(tf.fill(kernel.shape, np.inf))  # Every gradient becomes non-finite.
    trainer.train_steps(1)
    assert int(trainer.skipped_steps.numpy()) == 1 and trainer.loss_scale == 2.0 ** 14
    assert int(trainer.global_step.numpy()) == 1
    for got, want in zip(trainer.model.weights[1:], before[1:]):  # Nothing was applied.
        np.testing.assert_array_equal(got.numpy(), want)
