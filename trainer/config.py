"""The run configuration: one frozen, validated object built from flags or by hand."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from trainer.errors import ConfigError

# The allowed values of the settings a fixed list decides. These lists are the one place
# each is written: the flags (trainer/cli/config_flags.py) and the checks below use them, and
# tests/test_config.py checks that the modules implementing them (trainer/core/precision.py,
# trainer/core/optimizers.py) agree. They live here, not in those modules, because the flags
# are parsed before TensorFlow is imported. Models are an open registry (trainer/registry.py),
# looked up when the run builds one.
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
# What --policy takes: a policy, or 'auto', which a trial before training turns into one of
# POLICIES (trainer/tools/auto_policy.py); nothing below the job ever sees 'auto'.
POLICY_SETTINGS = POLICIES + ("auto",)
DEVICES = ("auto", "cpu", "gpu", "hpu")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine")
DISTRIBUTIONS = ("auto", "none", "mirrored", "multi_worker", "hpu")
PROGRESS = ("auto", "bar", "log", "none")
FLOAT32_MAX = 3.4028234663852886e38
MAX_SYNTHETIC_EXAMPLES = 10_000_000


# The built-in datasets (trainer/data/ loads them): (image shape, classes) of each, known
# without loading it (the audit needs no data). --dataset also takes tfds:NAME[/CONFIG].
DATASET_SHAPES = {
    "fashion_mnist": ((28, 28, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "synthetic": ((28, 28, 1), 10),
}


def dataset_names() -> Tuple[str, ...]:
    """The built-in datasets' names; ``tfds:NAME`` is also accepted."""
    return tuple(DATASET_SHAPES)


def parse_profile_steps(text: str) -> Tuple[int, int]:
    """'START,END' -> (START, END): two integers with 0 <= START < END.

    Raises:
      ConfigError: for anything else, saying what the flag takes.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        start, end = (int(part) for part in parts)
    except ValueError:
        start = end = None
    if start is None or not 0 <= start < end:
        raise ConfigError(
            f"profile_steps must be START,END with integers 0 <= START < END (the trace covers "
            f"steps START+1 to END), got {text!r}, e.g. --profile_steps=10,20 (--profile_steps)")
    return start, end


def unsupported_reason(device_kind: str, policy: str) -> str:
    """Why ``policy`` cannot run on a ``device_kind`` device at all ('' when it can)."""
    if device_kind == "hpu" and policy == "mixed_float16":
        return "Gaudi has no float16 TensorFlow kernels; use --policy=mixed_bfloat16"
    return ""


# The range of a fixed loss scale. Keras' own dynamic scale never drops below 1 (it halves
# down to 1 and stops): a scale below 1 only pushes small gradients further into underflow,
# the opposite of what scaling is for (--loss_scale=none turns it off). Above 2**126 the
# reciprocal that unscales the gradients is a float32 subnormal, which TensorFlow flushes to
# zero: every gradient becomes 0 and training silently stops learning (1e38 does exactly
# that), and past float32's maximum (~3.4e38) the scale cannot even be made a tensor.
MIN_FIXED_LOSS_SCALE = 1.0
MAX_FIXED_LOSS_SCALE = 2.0 ** 126


def parse_loss_scale(value: Union[str, float, int, None]) -> Union[str, float]:
    """Normalises a loss-scale setting to 'auto', 'dynamic', 'none' or a fixed float.

    Raises:
      ConfigError: for text that is none of these, or a fixed scale that is not a finite
        number in [MIN_FIXED_LOSS_SCALE, MAX_FIXED_LOSS_SCALE].
    """
    if value is None:
        return "auto"
    if isinstance(value, str) and value.strip().lower() in ("auto", "dynamic", "none"):
        return value.strip().lower()
    scale = _to_float(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if scale is None or math.isnan(scale) or scale <= 0:
        raise ConfigError(
            f"loss_scale must be 'dynamic', 'none' or a positive number, got {shown} "
            "(--loss_scale)")
    _check_fixed_loss_scale(scale, shown)
    return scale


def _to_float(value) -> Optional[float]:
    """``value`` as a float (inf when too large for one); None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        return None
    except OverflowError:  # An int beyond float range, e.g. 10**400.
        return math.inf if value > 0 else -math.inf


def _check_fixed_loss_scale(scale: float, shown: str) -> None:
    if scale < MIN_FIXED_LOSS_SCALE:
        raise ConfigError(
            f"loss_scale {shown} is below 1, which only makes small gradients underflow; pass "
            "a fixed scale >= 1, or --loss_scale=none to turn scaling off (--loss_scale)")
    if scale > MAX_FIXED_LOSS_SCALE:
        raise ConfigError(
            f"loss_scale {shown} is too large: above 2**126 (about 8.5e37) unscaling flushes "
            "every float32 gradient to zero; pass a fixed scale such as 32768, or "
            "--loss_scale=dynamic (--loss_scale)")


def parse_model_args(text: str) -> dict:
    """Parses 'units=64,depth=2' into {'units': 64, 'depth': 2} (ints, floats, bools, strings)."""
    result: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"model_args must look like 'name=value,name=value', got {text!r} (--model_args)")
        result[key.strip()] = _parse_scalar(raw.strip())
    return result


def _parse_scalar(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _setting(default=dataclasses.MISSING, help: str = "", *, choices: Sequence[str] = (),
             flag: bool = True, default_factory=dataclasses.MISSING):
    """A TrainConfig field with its command-line documentation (trainer/cli/config_flags.py reads it).

    Args:
      default, default_factory: the field's default (also the flag's).
      help: the flag's help text.
      choices: the allowed values when a fixed list decides them (the flag is an enum).
      flag: False for a field that is no command-line flag.
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={
        "help": help, "choices": tuple(choices), "flag": flag})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs; invalid values raise ConfigError naming the field and value.

    Every field but ``verbose`` is a flag of ``run.py`` with the same name, default and help
    (generated by :mod:`trainer.cli.config_flags`; see ``python run.py --helpfull``).
    """

    policy: str = _setting(
        "mixed_bfloat16", "Keras dtype policy (auto: time a short trial of each policy this "
        "device supports from the same weights and batches, check the 16-bit ones with the "
        "numerics inspector, and train the fastest that passes; kept in MODEL_DIR/run.json "
        "for a resume).", choices=POLICY_SETTINGS)
    dry_run: bool = _setting(
        False, "With --policy=auto: run the policy trial, print its table and exit (no "
        "training, nothing written).")
    device: str = _setting("auto", "Device (auto: hpu > gpu > cpu).", choices=DEVICES)
    model: str = _setting("mlp", "A registered model (built in: trainer/models/; yours: @register_model in your "
                          "code).")
    model_args: Mapping[str, Any] = _setting(
        default_factory=dict, help="The model's keyword arguments, e.g. 'units=64' or "
        "'width=16,depth=3' (ints, floats, true/false, text).")
    dataset: str = _setting("fashion_mnist", "A dataset of trainer/data/__init__.py (fashion_mnist "
                            "works offline), tfds:NAME[/CONFIG] for a TensorFlow Datasets "
                            "set already prepared in --data_dir (never downloaded), or "
                            "tfrecord:GLOB for image TFRecord shards (streamed; ImageNet "
                            "layout, see python -m trainer.data.write_shards).")
    data_dir: Optional[str] = _setting(
        None, "Folder with the dataset files (IDX .gz, or mnist.npz; tfds: its data_dir).")
    eval_data: str = _setting(
        "", "tfrecord: the evaluation files' glob (default: the training glob with 'train' "
        "replaced by 'validation', else 'test').")
    image_size: int = _setting(
        0, "tfrecord: train on N x N images (resized, cropped; 0: the stored size, if square).")
    num_classes: int = _setting(
        0, "tfrecord: the class count (0: from labels.txt beside the files, else the labels).")
    label_offset: int = _setting(
        0, "tfrecord: subtracted from each stored label (1 for TF-models' ImageNet shards).")
    augment: bool = _setting(True, "tfrecord: random crop and flip of training images.")
    parallel_calls: int = _setting(
        0, "tfrecord: images decoded in parallel (0: two per CPU core).")
    epochs: int = _setting(8, "Passes over the training split.")
    batch_size: int = _setting(128, "Global batch size (split across replicas).")
    learning_rate: float = _setting(1e-3, "Learning rate (the peak, under a schedule).")
    optimizer: str = _setting("adam", "Optimizer (the run's Keras; momentum: SGD with 0.9, adamw: "
                              "weight decay 1e-4).", choices=OPTIMIZERS)
    loss_scale: Union[str, float] = _setting(
        "auto", "dynamic | none | a number from 1 to 2**126 (a fixed scale) | auto (dynamic "
        "for mixed policies, none for float32).")
    steps_per_loop: int = _setting(100, "Train steps per compiled call (an in-graph loop).")
    validation_split: float = _setting(
        0.1, "Fraction of the training data held out for validation (taken from the end).")
    seed: int = _setting(42, "Random seed for weights and data order (below 2**32).")
    model_dir: Optional[str] = _setting(
        None, "Folder for checkpoints, summaries and the profile; a second run resumes there.")
    metrics_file: Optional[str] = _setting(None, "Write a JSON summary of the run here.")
    auto_cast_outputs: bool = _setting(
        False, "Cast non-float32 model outputs to float32 instead of refusing the model.")
    synthetic_examples: int = _setting(4096, "Training examples of --dataset=synthetic.")
    # Not a flag: run.py always prints; library callers turn the output off.
    verbose: bool = _setting(True, "Print the banner, the log lines and the test line.",
                             flag=False)
    # Checkpointing, resume and the production loop.
    checkpoint_every: int = _setting(
        0, "Save a checkpoint every N steps (0: at the end of every epoch); needs --model_dir.")
    keep_checkpoints: int = _setting(3, "How many recent checkpoints to keep.")
    deterministic: bool = _setting(
        False, "Seed everything and enable TF op determinism (bit-exact resume).")
    allow_policy_change: bool = _setting(
        False, "Allow resuming a checkpoint written under another dtype policy.")
    max_consecutive_skips: int = _setting(
        100, "Stop when this many steps in a row are skipped as non-finite (0: never).")
    recover_trials: int = _setting(
        0, "When training diverges (a non-finite storm, or the loss above --loss_upper_bound), "
        "restore the last checkpoint and go on, at most N times (0: stop with an error); "
        "needs --model_dir.")
    loss_upper_bound: float = _setting(
        0.0, "Treat a mean training loss above this (or not finite) as divergence, checked "
        "after every step loop (0: off).")
    eval_every: int = _setting(0, "Evaluate every N steps (0: at the end of each epoch).")
    best_metric: str = _setting(
        "auto", "Validation metric that picks the best checkpoint kept in --model_dir (auto: "
        "accuracy when the model reports it, else loss; losses and errors are minimised, "
        "accuracies maximised).")
    grad_accum_steps: int = _setting(1, "Micro-batches accumulated per optimizer step.")
    clip_norm: float = _setting(
        0.0, "Clip gradients to this global norm after unscaling (0: off).")
    jit_compile: bool = _setting(
        False, "Compile the per-replica forward and backward pass with XLA (the iterator, "
        "all-reduce and optimizer update stay outside; refused on Gaudi, which has no XLA).")
    lr_schedule: str = _setting("constant", "Learning-rate schedule (cosine: decay to 0 over "
                                "the run).", choices=SCHEDULES)
    warmup_steps: int = _setting(0, "Linear warm-up steps before the schedule.")
    progress: str = _setting("auto", "How training reports (auto: a bar on a terminal, log "
                             "lines otherwise).", choices=PROGRESS)
    # Precision toolkit.
    audit: bool = _setting(False, "Print the per-layer precision audit and exit (no training).")
    compare_policies: str = _setting(
        "", "Comma list of policies to train and compare from identical weights, e.g. "
        "float32,mixed_bfloat16 (writes comparison.json/.csv/.png into --model_dir).")
    numerics: bool = _setting(
        False, "Print the per-layer numerics report of --policy against float32 and exit "
        "(no training).")
    numerics_every: int = _setting(
        0, "Log per-layer numerics statistics (activation ranges, underflow) to TensorBoard "
        "every N steps (0: off); needs --model_dir.")
    # Outputs beyond checkpoints.
    export_dir: Optional[str] = _setting(
        None, "Write the trained model as a SavedModel here at the end of training.")
    profile_steps: str = _setting(
        "", "START,END: write a TensorBoard profiler trace of global steps START+1..END into "
        "MODEL_DIR/profile (chief only; needs --model_dir, 0 <= START < END). Step loops "
        "break at START and END, so the trace holds whole compiled step loops of exactly "
        "those steps.")
    # Distribution.
    distribution: str = _setting(
        "auto", "The tf.distribute strategy (mirrored: local GPUs; auto: hpu for several "
        "Gaudi workers, multi_worker for a cluster, mirrored for several GPUs, else none).",
        choices=DISTRIBUTIONS)
    worker_hosts: str = _setting(
        "", "Comma list of hosts (host or host:slots) for multi-worker runs under mpirun.")
    base_port: int = _setting(7850, "Worker i on a host listens on base_port + local rank.")

    def __post_init__(self):
        _check_choice("policy", self.policy, POLICY_SETTINGS)
        if self.policy == "auto":
            for name in ("audit", "numerics"):
                if getattr(self, name):
                    raise ConfigError(
                        f"--{name} inspects one policy, and --policy=auto picks one only by "
                        f"a trial before training; pass the policy to inspect, e.g. "
                        f"--policy=mixed_bfloat16 (--{name})")
        elif self.dry_run:
            raise ConfigError(
                f"dry_run shows the decision of --policy=auto; with --policy={self.policy} "
                "there is nothing to decide: add --policy=auto or drop --dry_run (--dry_run)")
        _check_choice("device", self.device, DEVICES)
        streamed = isinstance(self.dataset, str) and self.dataset.startswith("tfrecord:")
        if not (isinstance(self.dataset, str) and self.dataset.startswith(("tfds:", "tfrecord:"))
                and len(self.dataset.split(":", 1)[1]) > 0):
            _check_choice("dataset", self.dataset, dataset_names())
        for name in ("image_size", "num_classes", "label_offset", "parallel_calls"):
            _check_int(name, getattr(self, name), minimum=0)
        for name, off in (("eval_data", ""), ("image_size", 0), ("num_classes", 0),
                          ("label_offset", 0), ("augment", True), ("parallel_calls", 0)):
            if not streamed and getattr(self, name) != off:
                raise ConfigError(f"{name} applies to --dataset=tfrecord:GLOB only, not to "
                                  f"--dataset={self.dataset} (--{name})")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_int("epochs", self.epochs, minimum=0)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("steps_per_loop", self.steps_per_loop, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 2 ** 32:
            raise ConfigError(f"seed must be below 2**32 (TensorFlow's and NumPy's limit), got "
                              f"{self.seed} (--seed)")
        if self.synthetic_examples > MAX_SYNTHETIC_EXAMPLES:
            raise ConfigError(
                f"synthetic_examples must be at most {MAX_SYNTHETIC_EXAMPLES:,} (the synthetic set "
                f"is held in memory, 784 bytes per example), got {self.synthetic_examples} "
                "(--synthetic_examples)")
        _check_int("synthetic_examples", self.synthetic_examples, minimum=1)
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("progress", self.progress, PROGRESS)
        for name in ("checkpoint_every", "max_consecutive_skips", "eval_every", "warmup_steps",
                     "numerics_every", "recover_trials"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("keep_checkpoints", "grad_accum_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("base_port", self.base_port, minimum=1)
        if self.base_port > 65535:
            raise ConfigError(f"base_port must be a TCP port (1-65535), got {self.base_port} "
                              "(--base_port)")
        if not _is_number(self.clip_norm) or not 0 <= self.clip_norm <= FLOAT32_MAX:
            raise ConfigError(
                f"clip_norm must be a number from 0 (off) to float32's largest, 3.4e38, got "
                f"{self.clip_norm!r} "
                "(--clip_norm)")
        if self.profile_steps:
            parse_profile_steps(self.profile_steps)
            if not self.model_dir:
                raise ConfigError(
                    f"profile_steps={self.profile_steps} writes its trace into MODEL_DIR/profile; "
                    "pass --model_dir (--profile_steps)")
        if not _is_number(self.loss_upper_bound) or not 0 <= self.loss_upper_bound <= FLOAT32_MAX:
            raise ConfigError(
                f"loss_upper_bound must be a number from 0 (off) to float32's largest, 3.4e38, "
                f"got {self.loss_upper_bound!r} (--loss_upper_bound)")
        if self.recover_trials and not self.model_dir:
            raise ConfigError(
                f"recover_trials={self.recover_trials} restores the last checkpoint when "
                "training diverges, so it needs a folder of checkpoints; pass --model_dir "
                "(--recover_trials)")
        if self.checkpoint_every and not self.model_dir:
            raise ConfigError(
                f"checkpoint_every={self.checkpoint_every} needs a folder to save into; pass "
                "--model_dir (--checkpoint_every)")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                f"{self.grad_accum_steps}; the batch is split into that many micro-batches "
                "(--grad_accum_steps)")
        if not _is_number(self.learning_rate) or not 0 < self.learning_rate < math.inf:
            raise ConfigError(
                f"learning_rate must be a positive number, got {self.learning_rate!r} "
                "(--learning_rate)")
        if not _is_number(self.validation_split) or not 0 <= self.validation_split < 1:
            raise ConfigError(
                f"validation_split must be in [0, 1), got {self.validation_split!r} "
                "(--validation_split)")
        object.__setattr__(self, "loss_scale", parse_loss_scale(self.loss_scale))
        if isinstance(self.model_args, str):
            object.__setattr__(self, "model_args", parse_model_args(self.model_args))
        object.__setattr__(self, "model_args", dict(self.model_args))
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(
                f"data_dir {self.data_dir!r} is not a directory; pass the folder that holds the "
                "dataset files (--data_dir)")
        if self.metrics_file is not None and os.path.isdir(self.metrics_file):
            raise ConfigError(
                f"metrics_file {self.metrics_file!r} is a directory; pass a file path such as "
                f"{os.path.join(self.metrics_file, 'metrics.json')!r} (--metrics_file)")
        reason = unsupported_reason(self.device, self.policy)
        if reason:
            raise ConfigError(f"policy {self.policy!r} cannot run on --device={self.device}: "
                              f"{reason}")
        if self.jit_compile and self.device == "hpu":
            raise ConfigError(
                "jit_compile compiles the forward and backward pass with XLA, which Gaudi does "
                "not have (Habana's bridge compiles graphs for the HPU itself); drop "
                "--jit_compile, or use it with --device=cpu or --device=gpu (--jit_compile)")

    @property
    def resolved_loss_scale(self) -> Union[str, float]:
        """'dynamic', 'none' or a fixed float: 'auto' means dynamic for mixed policies."""
        if self.loss_scale == "auto":
            return "none" if self.policy == "float32" else "dynamic"
        return self.loss_scale

    def replace(self, **changes) -> "TrainConfig":
        """Returns a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}; choose one of: {', '.join(choices)} (--{name})")


def _check_int(name: str, value, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r} (--{name})")
