"""The command line, ``python run.py`` (installed as ``mptrain``): flags -> TrainConfig -> a job.

A user mistake prints one ``error:`` line and exits 1. Flags parse before TensorFlow is
imported, so a bad value costs no TensorFlow start-up, and the start-up itself is quiet:
TensorFlow's C++ log lines (CUDA probing, the oneDNN notice, XLA service lines) are shown only
with ``--verbosity=1`` or more.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator, List, Optional

from absl import app, flags, logging

from trainer.cli import config_flags
from trainer.config import TrainConfig
from trainer.errors import UserError, exit_with
from trainer.runtime import worker_env

FLAGS = flags.FLAGS
# Set by the launchers of a multi-process job (mpirun, Horovod, trainer.launch, TF_CONFIG).
_MULTI_PROCESS_VARIABLES = ("TF_CONFIG",) + tuple(
    names[1] for names in worker_env.RANK_VARIABLES.values())  # Each launcher's world size.
_HELP_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "?")
# What TensorFlow's C++ runtime writes to stderr while it is imported, before it reads
# TF_CPP_MIN_LOG_LEVEL (its absl logging is not initialised yet, so the level does not apply):
# the absl notice itself and INFO/WARNING/ERROR lines such as 'oneDNN custom operations are
# on', 'Could not find cuda drivers' or 'Unable to register cuDNN factory' (TF 2.21's format,
# and TF 2.15's when the level was lowered). FATAL lines and anything else (Python warnings
# included) are kept.
_STARTUP_NOISE = re.compile(
    r"^([IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\] |\d{4}-\d\d-\d\d [\d:.]+: [IWE] \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .*rebuild TensorFlow)")


def main(argv: Optional[List[str]] = None) -> None:
    """Parses the flags (``argv`` defaults to ``sys.argv``), then trains; never returns."""
    if "policy" not in FLAGS:
        config_flags.define_flags(FLAGS)
        for name in config_flags.flag_names():  # Listed by --help, not only by --helpfull.
            FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    app.run(_run, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: List[str]) -> List[str]:
    """absl's parser, with a bad flag value reported as one ``error:`` line."""
    if any(arg.lstrip("-").split("=")[0] in _HELP_FLAGS for arg in argv[1:]
           if arg.startswith("-")):
        start_tensorflow(verbose=False)
        config_flags.describe_registries(FLAGS)  # --help lists the models and datasets.
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}; see --helpfull for the flags")


def _run(argv: List[str]) -> int:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags look like --name=value "
                 "(see --helpfull)")
    start_tensorflow(verbose=FLAGS.verbosity >= 1)
    from trainer.compat import tf  # After the flags, and quietly (start_tensorflow above).

    if not FLAGS["verbosity"].present:
        # TF's Python INFO lines (checkpoint timings) are noise to a user.
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")
    try:
        return run_config(config_flags.config_from_flags(FLAGS))
    except UserError as error:
        exit_with(error)


def run_config(config: TrainConfig) -> int:
    """What the command line does with a config: the ``--policy=auto`` trial alone
    (``--dry_run``), the audit, the numerics inspector, a policy comparison, or a training job
    (:func:`trainer.job.run`). Returns the exit status."""
    # Here, not at the top: each imports TensorFlow, and --help and flag errors must not.
    from trainer import job
    from trainer.runtime import distribution
    from trainer.tools import audit, auto_policy, compare, numerics

    if config.dry_run:
        return auto_policy.run(config)
    if config.audit:
        return audit.run(config)
    if config.numerics:
        return numerics.run(config)
    if config.compare_policies:
        compare.run(config)
        return 0
    with distribution.worker_failures_as_errors():
        job.run(config)
    return 0


def start_tensorflow(*, verbose: bool) -> None:
    """Imports TensorFlow (through trainer.compat), quietly unless ``verbose``.

    Quiet: ``TF_CPP_MIN_LOG_LEVEL=3`` (unless set already) keeps the C++ runtime's INFO,
    WARNING and ERROR lines out (a failure reaches the user as an exception, printed as one
    ``error:`` line), and the lines it prints while being imported, which ignore that level,
    are filtered out. A multi-process job always uses level 3: a dead peer makes the gRPC
    runtime print pages of ERROR lines before our one ``error:`` line, whose exception
    carries the same cause.
    """
    multi_process = any(os.environ.get(name) for name in _MULTI_PROCESS_VARIABLES)
    if multi_process or not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if verbose or "tensorflow" in sys.modules:
        _import_tensorflow()
        return
    with _startup_lines_filtered():
        _import_tensorflow()


def _import_tensorflow() -> None:
    import trainer.compat  # noqa: F401  The import is the point: TensorFlow starts here.


@contextlib.contextmanager
def _startup_lines_filtered() -> Iterator[None]:
    """Sends file descriptor 2 to a file for the block; then writes back what is not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not _STARTUP_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
