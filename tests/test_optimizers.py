"""trainer/core/optimizers.py: the fused optimizer update changes speed, not results."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config

from trainer import compat
from trainer.core.steps import Trainer


def _train(config, fused: bool):
    trainer = Trainer(config)
    assert compat.is_fused(trainer.loss_scaler.inner_optimizer)  # optimizers.prepare: default.
    compat.set_fused(trainer.loss_scaler.inner_optimizer, fused)  # Before the first trace.
    assert compat.is_fused(trainer.loss_scaler.inner_optimizer) == fused
    trainer.train_steps(3)
    trainer.train_steps(4)
    return trainer


@pytest.mark.parametrize("policy, optimizer, schedule", [
    ("float32", "adamw", "cosine"), ("mixed_bfloat16", "adam", "constant"),
    ("mixed_float16", "momentum", "constant"), ("float32", "rmsprop", "constant")])
def test_fused_update_equals_the_plain_update(policy, optimizer, schedule):
    config = small_config(policy=policy, optimizer=optimizer, lr_schedule=schedule,
                          warmup_steps=2, deterministic=True)
    fused, plain = _train(config, True), _train(config, False)
    assert int(fused.global_step.numpy()) == int(plain.global_step.numpy()) == 7
    assert fused.loss_scale == plain.loss_scale
    for got, want in zip(compat.weights(fused.model), compat.weights(plain.model)):
        # XLA may contract a multiply-add into one FMA: equal up to float rounding.
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-6, atol=1e-7)
