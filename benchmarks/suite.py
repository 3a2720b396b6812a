"""The benchmarked configurations and our Trainer's runners, shared by the benchmark scripts.

Holds the policies (POLICIES), the levers and experiments timed on top of our defaults
(INPUT_BASELINE, WHOLE_STEP_UPDATE, LEVERS, EXPERIMENTS, EXPERIMENT_MODELS), the configurations
(:class:`Bench`, BENCHES, :func:`train_config`) and how our Trainer runs each variant
(:class:`PipelineTrainer`, :func:`whole_step_update`, :class:`OursRunner`).
``benchmarks/run.py`` times them against Keras ``Model.fit``; ``benchmarks/footprint.py``
measures one of them in a fresh process.
"""

from __future__ import annotations

import dataclasses
import time

from trainer import compat
from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.core.steps import Trainer

POLICIES = ("float32", "mixed_bfloat16")
# Our loop with one lever changed; on every configuration, to show what in-graph input buys.
INPUT_BASELINE = "ours+tf.data"
# ... and what the whole optimizer update as one XLA computation would change (Keras compiles
# one per variable, the default).
WHOLE_STEP_UPDATE = "ours+whole_step_update"
LEVERS = (INPUT_BASELINE, WHOLE_STEP_UPDATE)
# Only on the compute-bound configurations (see OursRunner), with the policies each applies to.
EXPERIMENTS = {"ours+unfused_update": POLICIES, "ours+jit": POLICIES,
               "ours+cast_once": ("mixed_bfloat16",), "ours+onednn_amp": ("mixed_bfloat16",),
               "ours+fused_ops": POLICIES}
if compat.KERAS_MAJOR == 3:  # cast_once patches Keras 2's AutoCastVariable.
    del EXPERIMENTS["ours+cast_once"]
# Experiments that only exist for some models.
EXPERIMENT_MODELS = {"ours+fused_ops": ("transformer",)}


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmarked configuration."""

    name: str
    model: str
    model_args: dict
    batch_size: int
    steps_per_loop: int
    # Time the experiments (EXPERIMENTS) too: the compute-bound configurations (wide MLP,
    # wide transformer) and the default transformer, whose MFU is the lowest.
    experiments: bool = False


BENCHES = (
    Bench("mlp (seed, units 256)", "mlp", {"units": 256}, 128, 100),
    Bench("mlp wide (units 2048)", "mlp", {"units": 2048}, 256, 10, experiments=True),
    Bench("cnn", "cnn", {}, 128, 10),
    Bench("resnet", "resnet", {}, 128, 10),
    Bench("transformer", "transformer", {}, 128, 10, experiments=True),
    Bench("transformer wide (dim 128, mlp x4)", "transformer",
          {"dim": 128, "heads": 4, "mlp_ratio": 4}, 128, 5, experiments=True),
)


def train_config(bench: Bench, policy: str, **overrides) -> TrainConfig:
    """The TrainConfig every runner of ``bench`` under ``policy`` uses (ours and Model.fit)."""
    return TrainConfig(model=bench.model, model_args=bench.model_args, policy=policy,
                       dataset="synthetic", synthetic_examples=8192, validation_split=0.0,
                       batch_size=bench.batch_size, steps_per_loop=bench.steps_per_loop,
                       optimizer="adam", verbose=False, **overrides)


class PipelineTrainer(Trainer):
    """Our Trainer reading the tf.data pipeline (the input path before in-graph input).

    ``train`` is replaced by an equal pipeline, so ``Datasets.in_graph_input`` is None.
    """

    def build_datasets(self):
        datasets = super().build_datasets()
        return dataclasses.replace(datasets, train=datasets.train_from(0))


_ONEDNN_AMP = {"auto_mixed_precision_onednn_bfloat16": True}


def whole_step_update(trainer: Trainer) -> None:
    """Experiment: the whole optimizer update of a step as one XLA computation.

    Keras compiles each variable's update separately (``optimizers.prepare``); here one
    ``tf.function(jit_compile=True)`` holds every variable's update, the step counter and the
    schedule. Default strategy only (a distributed update calls ``merge_call``). Call before
    the first step; ``tests/test_benchmarks.py`` checks the weights equal the default's.
    """
    inner = trainer.loss_scaler.inner_optimizer
    compat.set_fused(inner, False)  # No per-variable computations inside the whole one.

    # The step's variables, captured: a Keras 3 variable cannot be a tf.function argument.
    variables = []

    @tf.function(jit_compile=True)
    def apply(gradients):
        compat.apply_gradients(inner, gradients, variables)

    def apply_step(gradients, unwrapped):
        variables[:] = unwrapped.value
        apply(list(gradients))

    trainer.loss_scaler._apply = apply_step


class OursRunner:
    """Our Trainer: ``loops`` compiled calls of ``steps_per_loop`` steps each.

    ``variant``: 'ours' (the defaults: in-graph input for in-memory data, each variable's
    optimizer update XLA-compiled), 'ours+tf.data' (the tf.data pipeline instead of in-graph
    input), 'ours+whole_step_update' (:func:`whole_step_update`), 'ours+jit'
    (``--jit_compile``: XLA forward/backward too), 'ours+unfused_update' (the update as Keras
    2 runs it on a CPU, not compiled), 'ours+cast_once' (benchmarks/cast_once.py),
    'ours+onednn_amp' (the float32 model under TensorFlow's graph-rewrite bf16
    auto-mixed-precision for oneDNN, what a CPU user could switch on instead of a Keras policy;
    timed as a bf16 variant) or 'ours+fused_ops' (the transformer built with
    ``fused_ops=True``).
    """

    def __init__(self, bench: Bench, policy: str, variant: str = "ours"):
        self.bench, self.policy, self.kind = bench, policy, variant
        if variant == "ours+onednn_amp":
            policy = "float32"
        cls = Trainer
        if variant == "ours+tf.data":
            cls = PipelineTrainer
        elif variant == "ours+cast_once":
            # Imported for this experiment only: cast_once reaches into Keras' private
            # AutoCastVariable module and registers a tensor conversion function on import,
            # which the other variants (and footprint.py's measurements) should not depend on.
            from benchmarks.cast_once import CastOnceTrainer as cls
        if variant == "ours+fused_ops":  # The transformer's fused LayerNorm and tanh GELU.
            bench = dataclasses.replace(bench, model_args={**bench.model_args, "fused_ops": True})
        self.trainer = cls(train_config(bench, policy, jit_compile=variant == "ours+jit"))
        if variant == "ours+unfused_update":  # Before the first call traces the step.
            compat.set_fused(self.trainer.loss_scaler.inner_optimizer, False)
        if variant == WHOLE_STEP_UPDATE:
            whole_step_update(self.trainer)
        self.model = self.trainer.model

    def seconds_per_step(self, loops: int) -> float:
        amp = self.kind == "ours+onednn_amp"
        if amp:  # A grappler option: it applies to graphs optimised while it is set.
            tf.config.optimizer.set_experimental_options(_ONEDNN_AMP)
        try:
            start = time.perf_counter()
            for _ in range(loops):
                self.trainer.train_steps(self.bench.steps_per_loop)
            int(self.trainer.global_step.numpy())  # Wait for the last step.
            return (time.perf_counter() - start) / (loops * self.bench.steps_per_loop)
        finally:
            if amp:
                tf.config.optimizer.set_experimental_options(
                    {key: False for key in _ONEDNN_AMP})
