"""``--policy=auto``: time a short trial of each policy the device supports, inspect the 16-bit
ones, and train the fastest that passes.

Before training, one Trainer per candidate policy (float32, mixed_bfloat16, and mixed_float16
where the device has fast float16 math) is built from the same initial weights (the float32
model's, as ``--compare_policies`` does) and reads the run's real training stream from its
first batch. Each 16-bit candidate is checked first by the numerics inspector
(:mod:`trainer.tools.numerics`) on that batch: a candidate with a flagged layer (an output that
overflows its dtype, gradients that flush to zero at the loss scale it would train with) fails.
Then the candidates train in turns, ``steps`` at a time, after one untimed call that traces;
a candidate's ms/step is the median of its timed calls, so a burst of load from another process
on a shared machine moves one call, not the figure. The pick (:func:`choose`) is a pure function
of those figures and verdicts: the fastest candidate that passes.

The trial's cost is bounded: it stops once each candidate was timed for ``MIN_TIMED_S`` and
the fastest passing candidate leads the next by more than ``CLEAR_MARGIN``, and never starts
a round that would end after the budget, ``max(MIN_BUDGET_S, BUDGET_FRACTION * the planned
run)`` (the planned run estimated from float32's figure); at least ``MIN_ROUNDS`` rounds run.
Building, inspecting and tracing count against the budget too. What it cannot know: how the policies
compare over a long run (a 16-bit run that diverges after thousands of steps, or ends less
accurate, looks fine in a trial of a few dozen).

In a job of several workers only the chief runs the trial (on objects of its own, outside the
job's strategy: :meth:`Lockstep.chief_alone`), and its choice reaches every worker in one
collective. The decision goes into ``MODEL_DIR/run.json``, so a resume keeps the policy its
checkpoints were trained under, without a new trial.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

from trainer import registry
from trainer.compat import tf
from trainer.config import POLICIES, TrainConfig, unsupported_reason
from trainer.core.steps import Trainer
from trainer.errors import UserError
from trainer.outputs import console, layout
from trainer.runtime import devices, distribution
from trainer.runtime.lockstep import Lockstep
from trainer.tools import compare, numerics

MIN_BUDGET_S = 15.0
BUDGET_FRACTION = 0.10  # Of the planned run: a long run can afford a longer look.
MIN_ROUNDS = 3  # The median of at least three calls per candidate.
MAX_ROUNDS = 500
# Timed calls are cheap next to building and tracing (a few ms per step against seconds of
# tracing on the seed model): each candidate is timed for at least this long before the trial
# may stop early, so that the ratios rest on more than a handful of calls.
MIN_TIMED_S = 1.0
CHUNK_STEPS = 10  # Steps per timed call (fewer when --steps_per_loop is smaller).
# The fastest passing candidate must lead the next by this much before the trial stops early.
CLEAR_MARGIN = 1.10
# What follows the last round (freeing the trial's models) is kept inside the budget too.
END_ALLOWANCE_S = 0.5


class TrialStopped(Exception):
    """A candidate's step loop stopped early in the trial (a non-finite storm)."""


@dataclasses.dataclass
class Candidate:
    """One policy of the trial and what was measured.

    Attributes:
      policy: the dtype policy.
      skipped: why it was not tried ('' when it was).
      failed: why its trial stopped part-way ('' when it did not), e.g. non-finite steps
        until the dynamic loss scale reached its floor.
      numerics: 'reference' (float32), 'OK', 'FLAGGED', or '' when not inspected.
      flagged_layers: the layers the inspector flagged.
      seconds: wall time of each timed call.
      steps_per_call: steps in each timed call.
    """

    policy: str
    skipped: str = ""
    failed: str = ""
    numerics: str = ""
    flagged_layers: Tuple[str, ...] = ()
    seconds: List[float] = dataclasses.field(default_factory=list)
    steps_per_call: int = 0

    @property
    def passed(self) -> bool:
        """Whether the policy may be chosen: tried to the end, and float32 or inspected OK."""
        return not self.skipped and not self.failed and self.numerics in ("reference", "OK")

    @property
    def ms_per_step(self) -> Optional[float]:
        """The median timed call's milliseconds per step (None when not timed)."""
        if not self.seconds or not self.steps_per_call:
            return None
        return 1000.0 * statistics.median(self.seconds) / self.steps_per_call


def choose(candidates: Sequence[Candidate]) -> str:
    """The policy to train: the fastest measured candidate among those that pass.

    A pure function of the figures and verdicts. On equal times the earlier candidate wins
    (float32 comes first, so a 16-bit policy must be strictly faster).

    Raises:
      ValueError: no candidate passes with a measured time (float32 always should).
    """
    eligible = [c for c in candidates if c.passed and c.ms_per_step is not None]
    if not eligible:
        raise ValueError("no policy of the trial passed with a measured time")
    return min(eligible, key=lambda c: c.ms_per_step).policy


def hardware_note(device: devices.DeviceInfo, policy: str) -> str:
    """Why ``policy`` is slow on ``device`` by its specification ('' when it should be fast)."""
    if policy == "mixed_bfloat16" and not device.fast_bf16:
        if device.kind == "cpu":
            return "this CPU has no AMX or AVX512-BF16, so bf16 is emulated"
        return "this GPU has no bf16 tensor cores (compute capability below 8.0)"
    if policy == "mixed_float16" and not device.fast_fp16:
        if device.kind == "cpu":
            return "this CPU has no AVX512-FP16 or AMX-FP16, so float16 is emulated"
        return "this GPU has no float16 tensor cores (compute capability below 7.0)"
    return ""


def candidates_for(device: devices.DeviceInfo) -> List[Candidate]:
    """float32, mixed_bfloat16, mixed_float16, each tried or with the reason it is not.

    mixed_float16 is tried only where the device has fast float16 math: elsewhere it is
    emulated, slower than float32 by design, and (unlike bf16) narrow in range.
    """
    rows = [Candidate("float32")]
    for policy in POLICIES[1:]:
        reason = unsupported_reason(device.kind, policy)
        if reason:
            rows.append(Candidate(policy, skipped=f"not tried: {reason.split(';')[0]}"))
        elif policy == "mixed_float16" and not device.fast_fp16:
            rows.append(Candidate(policy, skipped=f"not tried: {hardware_note(device, policy)}"))
        else:
            rows.append(Candidate(policy))
    return rows


def reasons(candidates: Sequence[Candidate], chosen: str,
            device: devices.DeviceInfo) -> Dict[str, str]:
    """The table's 'why' for each candidate: why it was chosen, or why not."""
    by_policy = {c.policy: c for c in candidates}
    best = by_policy[chosen].ms_per_step
    base = by_policy["float32"].ms_per_step
    fastest = min((c.ms_per_step for c in candidates if c.ms_per_step is not None), default=None)
    why = {}
    for c in candidates:
        ms = c.ms_per_step
        if c.skipped:
            why[c.policy] = c.skipped
        elif c.failed:
            why[c.policy] = f"{c.failed}: never chosen"
        elif not c.passed:
            layers = ", ".join(repr(name) for name in c.flagged_layers)
            lead = "fastest, but " if ms is not None and ms == fastest else ""
            why[c.policy] = f"{lead}numerics flagged {layers or 'the model'}: never chosen"
        elif c.policy == chosen:
            why[c.policy] = "fastest of those that pass"
        else:
            text = f"{ms / best:.2f}x the time of {chosen}"
            note = hardware_note(device, c.policy)
            if note and base is not None and ms > base:
                text += f": {note}"
            why[c.policy] = text
    return why


@dataclasses.dataclass
class Decision:
    """What the trial measured and chose."""

    policy: str
    candidates: List[Candidate]
    device: devices.DeviceInfo
    trial_seconds: float
    budget_seconds: float
    rounds: int

    def rows(self) -> List[dict]:
        """One dict per candidate: the table's columns as values (also run.json's record)."""
        base = next(c for c in self.candidates if c.policy == "float32").ms_per_step
        why = reasons(self.candidates, self.policy, self.device)
        return [{
            "policy": c.policy,
            "ms_per_step": c.ms_per_step,
            "speedup_vs_float32": (base / c.ms_per_step
                                   if base and c.ms_per_step else None),
            "numerics": c.numerics or None,
            "chosen": c.policy == self.policy,
            "why": why[c.policy],
        } for c in self.candidates]

    def as_json(self) -> dict:
        """The record kept in ``run.json`` (``policy_auto``)."""
        return {"policy": self.policy, "device": self.device.description,
                "trial_seconds": round(self.trial_seconds, 2),
                "budget_seconds": round(self.budget_seconds, 2), "rounds": self.rounds,
                "rows": self.rows()}


def format_decision(decision: Decision, *, dry_run: bool = False) -> str:
    """The decision as printed: a line on the trial, the table, the choice."""
    rows = decision.rows()
    steps = next((c.steps_per_call for c in decision.candidates if c.steps_per_call), 0)
    tried = [c.policy for c in decision.candidates if not c.skipped]
    body = [(r["policy"], "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}",
             "-" if r["speedup_vs_float32"] is None else f"{r['speedup_vs_float32']:.2f}x",
             r["numerics"] or "-", "yes" if r["chosen"] else "", r["why"]) for r in rows]
    table = console.format_table(("policy", "ms/step", "vs float32", "numerics", "chosen", "why"),
                                 body, right=(1, 2))
    return "\n".join([
        f"policy auto: {len(tried)} policies tried on {decision.device.description}, from the "
        f"same initial weights and first batches, {decision.rounds} rounds of {steps} steps "
        f"each: trial {decision.trial_seconds:.1f} s (budget {decision.budget_seconds:.0f} s)",
        table,
        f"policy auto: would train {decision.policy} (--dry_run: nothing trained)" if dry_run
        else f"policy auto: training {decision.policy}"])


class PolicyTrial:
    """Builds, inspects and times the candidates of one config; :meth:`run` decides.

    Args:
      config: the run's settings (its ``policy`` is ignored).
      device: the device the run uses.
      trainer_cls: the run's Trainer class (its hooks build the models and data).
      candidates: the policies to try (default: :func:`candidates_for` the device).
      planned_steps: the run's steps (default: its epochs), for the budget.
      min_budget_s: the budget's floor.
      clock: seconds as a float.
    """

    def __init__(self, config: TrainConfig, *, device: devices.DeviceInfo,
                 trainer_cls: Type[Trainer] = Trainer,
                 candidates: Optional[Sequence[Candidate]] = None,
                 planned_steps: Optional[int] = None, min_budget_s: float = MIN_BUDGET_S,
                 clock: Callable[[], float] = time.perf_counter):
        if min_budget_s <= 0:
            raise ValueError(f"min_budget_s must be positive, got {min_budget_s}")
        # A trial trains throw-away copies: nothing of the run's outputs or extras.
        self.config = config.replace(
            model_dir=None, metrics_file=None, export_dir=None, profile_steps="",
            checkpoint_every=0, numerics_every=0, recover_trials=0, dry_run=False,
            verbose=False, policy="float32")
        self.device = device
        self.trainer_cls = trainer_cls
        self.candidates = list(candidates) if candidates is not None else candidates_for(device)
        self.planned_steps = planned_steps
        self.min_budget_s = min_budget_s
        self.clock = clock
        self.steps = max(1, min(config.steps_per_loop, CHUNK_STEPS))
        self._steps_per_epoch = 0  # Known once a Trainer is built.

    def time_call(self, trainer: Trainer) -> float:
        """Seconds for one call of ``self.steps`` train steps (the step counter is read back,
        which waits for the device).

        Raises:
          TrialStopped: the call ran fewer steps: the step loop's storm check stopped it
            (``--max_consecutive_skips``, or a skip with the dynamic loss scale at its floor),
            and its time means nothing.
        """
        before = int(trainer.global_step.numpy())
        start = self.clock()
        trainer.train_steps(self.steps)
        ran = int(trainer.global_step.numpy()) - before
        seconds = self.clock() - start
        if ran < self.steps:
            raise TrialStopped(
                f"diverged in the trial: stopped at step {before + ran} with "
                f"{int(trainer.skipped_steps.numpy())} non-finite steps skipped")
        return seconds

    def _prepare(self, candidate: Candidate, initial: Optional[list]):
        """Builds the candidate's Trainer from the shared weights, inspects it, traces its
        step loop; returns (trainer, the initial weights)."""
        trainer = self.trainer_cls(self.config.replace(policy=candidate.policy))
        if initial is None:
            initial = compare.reference_weights(trainer)
        trainer.model.set_weights(initial)
        if candidate.policy == "float32":
            candidate.numerics = "reference"
        else:
            report = numerics.Inspector(trainer).report()
            candidate.flagged_layers = tuple(row.name for row in report.flagged)
            candidate.numerics = "FLAGGED" if report.flagged else "OK"
        self._steps_per_epoch = trainer.datasets.steps_per_epoch
        trainer.train_steps(self.steps)  # Traces and compiles: not timed.
        int(trainer.global_step.numpy())
        candidate.steps_per_call = self.steps
        return trainer, initial

    def run(self) -> Decision:
        """Runs the trial; returns the decision (float32 when no 16-bit policy passes)."""
        start = self.clock()
        trainers: Dict[str, Trainer] = {}
        initial = None
        for candidate in self.candidates:
            if candidate.skipped:
                continue
            try:
                trainers[candidate.policy], initial = self._prepare(candidate, initial)
            except (tf.errors.UnimplementedError, tf.errors.NotFoundError,
                    tf.errors.InvalidArgumentError) as error:
                if candidate.policy == "float32":
                    raise
                # A missing kernel for this dtype here: shown in the table, not a failure.
                candidate.skipped = f"failed: {type(error).__name__}: " + (
                    str(error.message).strip().splitlines() or [""])[0][:100]
        timed = [c for c in self.candidates if c.policy in trainers]
        budget, rounds = self.min_budget_s, 0
        while rounds < MAX_ROUNDS and timed:
            round_start = self.clock()
            for candidate in list(timed):
                try:
                    candidate.seconds.append(self.time_call(trainers[candidate.policy]))
                except TrialStopped as error:
                    candidate.failed, candidate.seconds = str(error), []
                    timed.remove(candidate)
            rounds += 1
            now = self.clock()
            budget = self._budget()
            if rounds < MIN_ROUNDS:
                continue
            if now - start + (now - round_start) + END_ALLOWANCE_S > budget:
                break  # The next round would end after the budget.
            if self._clear(timed) and all(sum(c.seconds) >= MIN_TIMED_S for c in timed):
                break
        trainers.clear()
        gc.collect()  # The trial's models and optimizers go before the run's are built.
        try:
            policy = choose(self.candidates)
        except ValueError:
            raise UserError(
                "--policy=auto: no policy trained through its trial ("
                + "; ".join(f"{c.policy}: {c.failed or c.skipped or c.numerics}"
                            for c in self.candidates)
                + "); the model diverges from the start: lower --learning_rate, set "
                "--clip_norm, or check the data for NaN/Inf") from None
        return Decision(policy=policy, candidates=self.candidates,
                        device=self.device, trial_seconds=self.clock() - start,
                        budget_seconds=budget, rounds=rounds)

    def _budget(self) -> float:
        """``max(min_budget_s, BUDGET_FRACTION * planned run)``, planned at float32's speed."""
        base = next(c for c in self.candidates if c.policy == "float32").ms_per_step or 0.0
        steps = self.planned_steps if self.planned_steps is not None else \
            self.config.epochs * self._steps_per_epoch
        return max(self.min_budget_s, BUDGET_FRACTION * steps * base / 1000.0)

    @staticmethod
    def _clear(timed: Sequence[Candidate]) -> bool:
        """Whether the fastest passing candidate leads the next passing one by CLEAR_MARGIN
        (with one passing candidate there is nothing to decide)."""
        times = sorted(c.ms_per_step for c in timed if c.passed)
        return len(times) < 2 or times[1] > CLEAR_MARGIN * times[0]


def kept_policy(model_dir: Optional[str]) -> Tuple[Optional[str], Optional[dict]]:
    """The policy ``model_dir``'s run.json records, and its trial record: (None, None) when
    there is none (a new folder, or one ``check_compatible`` will refuse anyway)."""
    if not model_dir or not os.path.exists(layout.run_file(model_dir)):
        return None, None
    try:
        with open(layout.run_file(model_dir)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None, None
    policy = saved.get("policy") if isinstance(saved, dict) else None
    if policy not in POLICIES:
        return None, None
    return policy, saved.get("policy_auto")


def resolve(config: TrainConfig, *, device: devices.DeviceInfo, lockstep: Lockstep,
            trainer_cls: Type[Trainer] = Trainer) -> Tuple[TrainConfig, Optional[dict]]:
    """``config`` with ``policy='auto'`` replaced by the chief's choice, on every worker.

    The chief keeps the policy ``config.model_dir/run.json`` records (a resume: no trial), or
    runs the trial and prints its table; its choice reaches the others in one collective.

    Returns:
      The config to train with, and the record for run.json (``policy_auto``; None on the
      other workers, which write no files).
    """
    index, record = 0, None
    with lockstep.chief_alone() as chief:
        if chief:
            policy, record = kept_policy(config.model_dir)
            if policy is not None:
                if config.verbose:
                    print(f"policy auto: {policy}, kept from "
                          f"{layout.run_file(config.model_dir)} (no new trial)", flush=True)
                record = record or {"policy": policy}
            else:
                decision = PolicyTrial(config, device=device, trainer_cls=trainer_cls).run()
                if config.verbose:
                    print(format_decision(decision), flush=True)
                policy, record = decision.policy, decision.as_json()
            index = POLICIES.index(policy)
    index = lockstep.broadcast_from_chief(index, name="auto policy")
    return config.replace(policy=POLICIES[index]), record


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer) -> int:
    """``run.py --policy=auto --dry_run``: runs the trial, prints its table, trains nothing.

    Always a new trial (a run.json in ``--model_dir`` is not consulted), in one process.
    """
    if trainer_cls is Trainer:
        registry.check_model_args(config.model, config.model_args)
    distribution.prepare(config)
    device = devices.select_device(config.device, policy=config.policy)
    devices.check_jit_compile(device, config.jit_compile)
    cluster = distribution.setup(config, device)
    if cluster.num_workers > 1:
        raise UserError("--dry_run times the policies in one process; run it without mpirun or "
                        "trainer.launch (a training run with --policy=auto decides on the chief "
                        "for every worker)")
    decision = PolicyTrial(config, device=device, trainer_cls=trainer_cls).run()
    print(format_decision(decision, dry_run=True), flush=True)
    return 0
