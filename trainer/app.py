"""One call that runs a whole training job from a TrainConfig (what ``run.py`` calls)."""

from __future__ import annotations

from typing import Type

from trainer import devices, distribute, loop, registry, reporting
from trainer.config import TrainConfig
from trainer.trainer import Trainer


def main(config: TrainConfig) -> int:
    """What ``run.py`` calls: the audit, a policy comparison, or a training run."""
    if config.audit:
        from trainer import audit
        return audit.run(config)
    if config.compare_policies:
        from trainer import compare
        compare.run(config)
        return 0
    run(config)
    return 0


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer) -> dict:
    """Selects the device, builds the Trainer, trains, tests and writes the metrics file.

    Every check of user input (model name and arguments, device, data files, output paths)
    happens before the first step, so a mistake costs seconds and writes nothing.

    Returns:
      The summary that ``--metrics_file`` receives.
    """
    if trainer_cls is Trainer:
        registry.check_model_args(config.model, config.model_args)
    if config.metrics_file:
        reporting.prepare_output_file(config.metrics_file)
    device = devices.select_device(config.device, policy=config.policy)
    cluster = distribute.setup(config, device)
    trainer = trainer_cls(config, strategy=cluster.strategy)
    verbose = config.verbose and cluster.is_chief
    if verbose:
        reporting.banner(device=device, config=config, trainer=trainer)
    result = loop.fit(trainer, epochs=config.epochs, steps_per_loop=config.steps_per_loop,
                      on_epoch_end=reporting.print_epoch if verbose else None)
    test = trainer.evaluate(trainer.datasets.test)
    if verbose:
        reporting.print_test(test)
    summary = {
        "policy": config.policy,
        "device": device.kind,
        "device_description": device.description,
        "model": config.model,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "loss_scale_mode": str(config.resolved_loss_scale),
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "val_accuracy": result.history[-1].validation.get("accuracy") if result.history else None,
        "examples_per_sec": result.examples_per_sec,
        "step_time_ms": result.step_time_ms,
        "loss_scale": trainer.loss_scale,
        "skipped_steps": int(trainer.skipped_steps.numpy()),
        "global_step": int(trainer.global_step.numpy()),
        "weights_checksum": trainer.weights_checksum(),
        "history": [
            {"epoch": h.epoch, **h.train, **{f"val_{k}": v for k, v in h.validation.items()},
             "ms_per_step": h.ms_per_step}
            for h in result.history
        ],
    }
    if config.metrics_file and cluster.is_chief:
        reporting.write_json(config.metrics_file, summary)
    return summary
