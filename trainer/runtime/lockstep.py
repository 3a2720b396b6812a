"""Every operation that is a collective across workers, in one place, and the rule they follow.

The rule: in a multi-worker job every worker runs the same collectives, in the same order.
Under ``MultiWorkerMirroredStrategy`` (and Habana's ``HPUStrategy``) these are collectives in
disguise, not only the all-reduce inside the train step:

- reading a Keras metric (``metric.result()`` all-reduces its sync-on-read totals);
- saving a checkpoint (it reads those same variables; non-chief workers save to a scratch
  folder for exactly that reason);
- the decision whether to save at the end of training, or to keep a best checkpoint;
- the stop vote between step loops (preemption, non-finite storms) and equality checks.

So every *decision* that leads to a collective is taken from values every worker computed
together (the global step, a reduced metric, a vote), never from local state such as files,
clocks or whether stdout is a terminal. Chief-only code does file and console output only,
from values already reduced: :meth:`Lockstep.chief_only` marks such code, and a collective
started inside it raises :class:`LockstepError` at once instead of deadlocking the job.

Every collective registers itself with :func:`collective` (name and order). The stop vote,
which all workers run after every step loop, carries a digest of that sequence, so workers
that ran different collectives since the last vote fail with one clear line instead of a
``Collective instance ... expected type`` error somewhere later.

Workers that fail a check together leave together (:meth:`Lockstep.fail_together`): each
prints the check's one ``error:`` line, none a lost peer's "Socket closed".
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import zlib
from typing import Dict, Iterator, List, Mapping, NoReturn, Optional

from trainer.errors import UserError
from trainer.runtime import worker_env

# Kept below 2**20 so that N * sum(x**2) stays far inside int64 for any realistic N.
_DIGEST_MOD = 1 << 20


class LockstepError(UserError):
    """The code broke the lockstep rule (ours, or a subclass's or action's): one clear line."""


class _Sequence(threading.local):
    """This process's collectives since the last vote, and whether chief-only code runs."""

    def __init__(self):
        self.count = 0
        self.digest = 0
        self.chief_only_depth = 0


_SEQUENCE = _Sequence()


def collective(name: str) -> None:
    """Registers one collective operation ``name``; call it right before the operation.

    Raises:
      LockstepError: when called from chief-only code, where other workers cannot join.
    """
    if _SEQUENCE.chief_only_depth:
        raise LockstepError(
            f"collective {name!r} inside chief-only code: every worker must run it, in the "
            "same order; take it out of the chief-only block and pass its value in")
    _SEQUENCE.count += 1
    _SEQUENCE.digest = (_SEQUENCE.digest * 31 + zlib.crc32(name.encode())) % _DIGEST_MOD
    fault_point(name)


# Fault injection for the multi-worker fault tests: TRAINER_FAULT_AT="w<rank>:<name>:<n>"
# kills worker <rank> with SIGKILL right before its n-th operation <name> (a collective name
# above, or "setup": before joining the cluster). Read once; unset, it costs one dict lookup.
_FAULT = os.environ.get("TRAINER_FAULT_AT", "")
_FAULT_SEEN: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Dies here when TRAINER_FAULT_AT names this worker, ``name`` and occurrence."""
    if not _FAULT:
        return
    _FAULT_SEEN[name] = count = _FAULT_SEEN.get(name, 0) + 1
    worker, _, rest = _FAULT.partition(":")
    target, _, nth = rest.rpartition(":")
    rank = next((os.environ[names[0]] for names in worker_env.RANK_VARIABLES.values()
                 if names[0] in os.environ), "0")
    if worker == f"w{rank}" and target == name and str(count) == nth:
        print(f"[fault] worker {rank} killed at {name} #{count}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def read_metrics(metrics: Mapping[str, object], *, name: str) -> Dict[str, float]:
    """Reads Keras metrics as floats: a collective under a multi-worker strategy."""
    collective(f"read {name}")
    return {key: float(metric.result()) for key, metric in metrics.items()}


class Lockstep:
    """The collectives of one job: votes, equality checks and collective decisions.

    Args:
      strategy: the job's ``tf.distribute`` strategy.
      num_workers: processes in the job (1: every method is local and free).
      is_chief: whether this process writes files and prints.
    """

    def __init__(self, *, strategy=None, num_workers: int = 1, is_chief: bool = True):
        self.strategy = strategy
        self.num_workers = num_workers
        self.is_chief = is_chief
        self._sum_fn = None

    @classmethod
    def of(cls, cluster) -> "Lockstep":
        """The Lockstep of a :class:`trainer.runtime.distribution.Cluster`."""
        return cls(strategy=cluster.strategy, num_workers=cluster.num_workers,
                   is_chief=cluster.is_chief)

    # ------------------------------------------------------------------ chief-only code

    @contextlib.contextmanager
    def chief_only(self) -> Iterator[bool]:
        """Marks output-only code; yields whether this process is the chief.

        ``with lockstep.chief_only() as chief: if chief: print(...)``. A collective inside
        the block raises :class:`LockstepError` on every worker, chief or not, so the
        mistake shows in a single-process test too.
        """
        _SEQUENCE.chief_only_depth += 1
        try:
            yield self.is_chief
        finally:
            _SEQUENCE.chief_only_depth -= 1

    @contextlib.contextmanager
    def chief_alone(self) -> Iterator[bool]:
        """Work only the chief does, on objects of its own (the default strategy, no peer).

        Yields whether this process is the chief. ``with lockstep.chief_alone() as chief: if
        chief: ...`` runs e.g. the ``--policy=auto`` trial: the trial's Trainers step and
        evaluate, which registers operations that are collectives in the job's Trainer but
        local here. They are not recorded, so the chief's sequence stays that of the other
        workers; the result reaches them through one real collective afterwards
        (:meth:`broadcast_from_chief`). Anything built on the job's strategy inside the
        block would be a real collective without peers: it must not be used there.
        """
        saved = _SEQUENCE.count, _SEQUENCE.digest
        try:
            yield self.is_chief
        finally:
            _SEQUENCE.count, _SEQUENCE.digest = saved

    # ------------------------------------------------------------------ collectives

    def broadcast_from_chief(self, value: int, *, name: str) -> int:
        """The chief's non-negative integer ``value`` on every worker (one collective).

        The other workers' ``value`` is ignored: a decision only the chief could take (it read
        a file, it ran a trial) becomes a shared value every worker then decides from.
        """
        collective(name)
        if self.num_workers <= 1:
            return int(value)
        return self._sum([int(value) if self.is_chief else 0])[0]

    def _sum(self, values: List[int]) -> List[int]:
        """Element-wise int64 sum over the workers (compiled once: eager collectives warn)."""
        from trainer.compat import tf  # Deferred: importable before TensorFlow is set up.

        if self._sum_fn is None:
            strategy = self.strategy

            @tf.function
            def total(x):
                per_replica = strategy.run(tf.identity, args=(x,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._sum_fn = total
        return [int(v) for v in self._sum_fn(tf.constant(values, tf.int64)).numpy()]

    def any(self, flag: bool, *, name: str = "any") -> bool:
        """True on every worker when ``flag`` is True on any of them."""
        collective(name)
        if self.num_workers <= 1:
            return bool(flag)
        return self._sum([int(bool(flag))])[0] > 0

    def all_equal(self, value: int, *, name: str = "all_equal") -> bool:
        """Whether every worker holds the same integer ``value``; all get the same answer.

        From sums alone: N * sum(x**2) == sum(x)**2 exactly when all x are equal.
        """
        collective(name)
        if self.num_workers <= 1:
            return True
        total, squares = self._sum([value, value * value])
        return self.num_workers * squares == total * total

    def stop_vote(self, reason: Optional[str]) -> Optional[str]:
        """Every worker stops at the same step when any one of them wants to.

        Runs after every step loop on every worker. Also checks that all workers ran the
        same collectives since the previous vote (count and order).

        Returns:
          ``reason`` on a worker that wanted to stop, "a signal to another worker" on the
          others when one did, else None.

        Raises:
          LockstepError: the workers' collective sequences differ.
        """
        collective("stop vote")
        count, digest = _SEQUENCE.count, _SEQUENCE.digest
        _SEQUENCE.count = _SEQUENCE.digest = 0
        if self.num_workers <= 1:
            return reason
        flag, total_c, squares_c, total_d, squares_d = self._sum(
            [int(bool(reason)), count, count * count, digest, digest * digest])
        n = self.num_workers
        if n * squares_c != total_c * total_c or n * squares_d != total_d * total_d:
            self.fail_together(LockstepError(
                "the workers ran different collectives since the last step loop (a decision "
                "was taken from local state); they cannot stay in step"), name="stop vote")
        if flag and not reason:
            return "a signal to another worker"
        return reason

    def fail_together(self, error: Exception, *, name: str) -> NoReturn:
        """Raises ``error`` on this worker once every worker is past the check it failed.

        Call it where every worker fails the same check, from values they share (a vote, a
        reduced value): all of them call it, with the same ``name``. A collective completes
        on one worker a moment before its peers have received their last piece of it; a
        worker that raised at once and exited would abort the collective its peer is still
        finishing ("Collective ops is aborted by: Socket closed"), and the peer would report
        a lost worker instead of the check's error. So the workers run one more collective
        first, the farewell: a worker that completes it knows that every peer completed the
        check (a peer sends its part of the farewell only after that), and a farewell that
        fails because a peer, done with it, already left is the expected end, not a new error.

        From here the worker is on its way out. When a peer exits with the error, the
        launcher (trainer.launch, mpirun) sends this worker SIGTERM at once: the first
        SIGTERM or SIGINT is recorded instead of obeyed, so the worker still prints its own
        line; a second one ends it (the default action is restored). Single-process: raises
        at once.

        Raises:
          error: always.
        """
        if self.num_workers > 1:
            _record_stop_signals()
            collective(f"{name}: leave together")
            from trainer.compat import tf  # Deferred, as in _sum.

            try:
                self._sum([0])
            except tf.errors.OpError:
                pass  # A peer that completed the farewell left; the check's result stands.
        raise error

    def progress_mode(self, requested: str) -> str:
        """'bar' or 'log' for ``requested == 'auto'``: a bar when the chief is on a terminal.

        Only the chief draws the bar, but every worker must read the training metrics with
        it, so the choice is voted on (under mpirun every rank's stdout is a terminal; under
        trainer.launch none is).
        """
        if requested != "auto":
            return requested
        on_terminal = self.is_chief and sys.stdout.isatty()
        return "bar" if self.any(on_terminal, name="progress mode") else "log"


def _record_stop_signals() -> None:
    """Until the process ends, the first SIGTERM or SIGINT only restores the default action.

    For a worker leaving with an error (:meth:`Lockstep.fail_together`): the signal a launcher
    sends when a peer left with the same error must not kill it before it says why; the
    stop it asks for is under way. Only the main thread can set handlers; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def restore(signum, frame) -> None:
        del signum, frame
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, restore)


def check_restored_steps(lockstep: Lockstep, step: int, model_dir: str) -> None:
    """Every worker restored the same step, or the job stops on all of them, together."""
    if not lockstep.all_equal(step, name="restored step"):
        lockstep.fail_together(UserError(
            f"the workers restored different steps from {model_dir}: it must be on a file "
            "system that every worker can read (the chief writes, all restore)"),
            name="restored step")
