"""Device selection: CPU, GPU or Intel Gaudi (HPU), with clear errors where one is missing.

Call :func:`select_device` before any TensorFlow op runs: hiding GPUs and loading Habana's
bridge both have to happen before the runtime initialises its devices.

Habana's bridge is only loaded once the Gaudi driver and a card are known to be there: with no
driver, ``load_habana_module()`` fails half-way (AttributeError) *after* registering the HPU
device with TensorFlow, and the next device query then aborts the whole process (SIGABRT in
the bridge's synapse shim). So a missing card must be found out before loading, not by it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import os
import sys
from typing import Optional, Tuple

from trainer.compat import tf
from trainer.config import unsupported_reason
from trainer.errors import UserError, warn

HABANA_MODULE = "habana_frameworks.tensorflow"
HABANA_TF_VERSION = "2.15.0"
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Forces the CPU bf16 answer ('0' or '1'); see cpu_bf16_flags.
CPU_BF16_ENV = "TRAINER_CPU_BF16"
# Module-level so tests can point it at a fake cpuinfo.
CPUINFO_PATH = "/proc/cpuinfo"
# The Gaudi driver's file that the bridge reads for the card type while it loads (1.14:
# habana_device.get_type); unreadable, load_habana_module() fails half-way. Module-level, like
# the device nodes below, so tests can point them at fake files.
HABANA_DRIVER_FILE = "/sys/class/accel/accel0/device/device_type"
# A card's device node (the kernel's accel subsystem). A container the cards were not passed
# into still sees the driver's files under /sys, but no node.
HABANA_DEVICE_NODES = "/dev/accel/accel[0-9]*"


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """The device a run uses.

    Attributes:
      kind: 'cpu', 'gpu' or 'hpu'.
      name: the TensorFlow device name, e.g. '/device:CPU:0'.
      description: a human-readable line for the start-up banner.
      fast_bf16: whether bfloat16 matmuls are faster than float32 here.
    """

    kind: str
    name: str
    description: str
    fast_bf16: bool
    fast_fp16: bool = False


def _cpuinfo_field(key: str, cpuinfo_path: Optional[str] = None) -> Optional[str]:
    """The value of the first CPU's ``key`` line in /proc/cpuinfo (None if absent/unreadable)."""
    try:
        with open(cpuinfo_path or CPUINFO_PATH) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags(cpuinfo_path: Optional[str] = None) -> set:
    """Every instruction-set flag of the first CPU in /proc/cpuinfo (empty if unreadable)."""
    return set((_cpuinfo_field("flags", cpuinfo_path) or "").split())


def _forced_cpu_bf16() -> Optional[bool]:
    """TRAINER_CPU_BF16 as a bool: None when unset or empty (see :func:`cpu_bf16_flags`).

    Raises:
      UserError: any value but '0', '1' or ''.
    """
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    if value in ("", "0", "1"):
        return None if not value else value == "1"
    raise UserError(
        f"{CPU_BF16_ENV}={value!r}: set it to 0 (act as on a CPU without bf16 instructions) or "
        f"1 (as on one with them), or unset it to read the CPU's flags from {CPUINFO_PATH}")


def cpu_bf16_flags(cpuinfo_path: Optional[str] = None) -> list:
    """The CPU's bf16 instruction-set flags (AMX, AVX512-BF16) found in /proc/cpuinfo.

    The environment variable ``TRAINER_CPU_BF16`` (:data:`CPU_BF16_ENV`) forces the answer
    for this machine's CPU, i.e. when ``cpuinfo_path`` is not given; a process started from
    this one inherits it. It lets one machine run the code, and the test suite, as on another
    kind of CPU (e.g. an AMD EPYC without AVX512-BF16, where ``--policy=mixed_bfloat16`` on
    the CPU prints the slow-bf16 ``warning:`` line):

    - ``0``: ``[]``, as on a CPU without bf16 instructions;
    - ``1``: ``['TRAINER_CPU_BF16=1']`` (the setting in place of the flags, so the device
      banner says where the answer came from), as on a CPU with them;
    - unset or empty: the flags read from ``cpuinfo_path`` or /proc/cpuinfo.

    Raises:
      UserError: ``TRAINER_CPU_BF16`` is set to anything else.
    """
    if cpuinfo_path is None:
        forced = _forced_cpu_bf16()
        if forced is not None:
            return [f"{CPU_BF16_ENV}=1"] if forced else []
    flags = _cpu_flags(cpuinfo_path)
    return [flag for flag in _CPU_BF16_FLAGS if flag in flags]


def _cpu_model(cpuinfo_path: Optional[str] = None) -> str:
    return _cpuinfo_field("model name", cpuinfo_path) or "unknown CPU"


def habana_available() -> bool:
    """True when Habana's bridge is installed (without importing it)."""
    try:
        return importlib.util.find_spec(HABANA_MODULE) is not None
    except ModuleNotFoundError:
        return False


def hpu_visible() -> bool:
    """True when TensorFlow lists an HPU (Habana's bridge is loaded and sees a card).

    Physical devices: listing them does not start the TensorFlow runtime.
    """
    return bool(tf.config.list_physical_devices("HPU"))


def gaudi_card() -> Tuple[str, str]:
    """The Gaudi card type the driver reports (e.g. 'GAUDI2') and, when unusable, why not.

    Reads only files: safe before TensorFlow starts and without loading the bridge.

    Returns:
      (card type, '') when the driver and at least one card are visible to this process,
      else ('', a short cause such as 'cannot read /sys/...: No such file or directory').
    """
    try:
        with open(HABANA_DRIVER_FILE) as f:
            card_type = f.readline().strip()
    except OSError as error:
        return "", f"cannot read {HABANA_DRIVER_FILE}: {error.strerror or error}"
    if not card_type:
        return "", f"{HABANA_DRIVER_FILE} is empty"
    if not glob.glob(HABANA_DEVICE_NODES):
        return "", (f"the driver reports a {card_type} but no device node matches "
                    f"{HABANA_DEVICE_NODES}: the card is not visible to this process (in a "
                    "container, pass the cards in)")
    return card_type, ""


def _hpu_unusable_reason() -> str:
    """Why the installed bridge cannot give this process an HPU ('' when it can)."""
    if tf.__version__ != HABANA_TF_VERSION:
        return f"it needs TensorFlow {HABANA_TF_VERSION} and this is TensorFlow {tf.__version__}"
    _, problem = gaudi_card()
    return f"no Gaudi driver/card was found ({problem})" if problem else ""


def _habana_missing_message(reason: str) -> str:
    return (
        f"--device=hpu needs Habana's TensorFlow bridge, but {reason}. The bridge is the "
        f"package habana-tensorflow (import {HABANA_MODULE}); it supports only TensorFlow "
        f"{HABANA_TF_VERSION} on Python 3.8 or 3.10, and this is TensorFlow {tf.__version__} on "
        f"Python {sys.version_info.major}.{sys.version_info.minor}. Install the Gaudi stack as "
        "BUILD.md ('Gaudi set-up') describes, or choose --device=cpu or --device=gpu.")


def load_habana() -> DeviceInfo:
    """Imports Habana's bridge, checks for a Gaudi card, loads the bridge, finds the HPU.

    Raises:
      UserError: the wrong TensorFlow, no bridge, no driver or card, a failed load, or no HPU
        device after loading; one line that says what to do.
    """
    if tf.__version__ != HABANA_TF_VERSION:
        raise UserError(_habana_missing_message(
            f"TensorFlow {tf.__version__} is installed and the bridge refuses any version "
            f"but {HABANA_TF_VERSION}"))
    try:
        habana = importlib.import_module(HABANA_MODULE)
    except ImportError as error:
        raise UserError(_habana_missing_message(f"importing it failed ({error})")) from None
    card_type, problem = gaudi_card()
    if problem:  # Before loading: a failed load leaves no way back to the CPU (module doc).
        raise UserError(
            f"--device=hpu but no Gaudi driver/card was found ({problem}); install and load "
            "the Gaudi driver (hl-smi lists the cards; BUILD.md, 'Gaudi set-up'), or train on "
            "the CPU with --device=cpu")
    try:
        habana.load_habana_module()
    except Exception as error:  # pylint: disable=broad-except - it raises whatever failed.
        cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise UserError(
            f"Habana's bridge failed to load on this {card_type} ({cause}); check that the "
            "Gaudi driver and habana-tensorflow come from the same Gaudi release (hl-smi shows "
            "the driver version; BUILD.md, 'Gaudi set-up'), or train on the CPU with "
            "--device=cpu (this process cannot fall back to it after a failed load)") from None
    # Physical, not logical, devices: listing logical ones starts the TensorFlow runtime, and
    # a multi-worker strategy (HPUStrategy) must be created before that happens.
    hpus = tf.config.list_physical_devices("HPU")
    if not hpus:
        raise UserError(
            "--device=hpu: Habana's bridge loaded but TensorFlow sees no HPU device; check that "
            "the Gaudi driver is loaded (hl-smi lists the cards) and that HABANA_VISIBLE_MODULES "
            "does not hide them")
    return DeviceInfo("hpu", "/device:HPU:0", f"Intel {card_type} HPU ({len(hpus)} visible)",
                      True)


def _gpu_info(gpu) -> DeviceInfo:
    details = tf.config.experimental.get_device_details(gpu)
    capability = details.get("compute_capability") or (0, 0)
    fast = tuple(capability) >= (8, 0)  # Ampere and newer have bf16 tensor cores.
    name = details.get("device_name", "GPU")
    return DeviceInfo("gpu", "/device:GPU:0",
                      f"{name} (compute capability {capability[0]}.{capability[1]})", fast,
                      fast_fp16=tuple(capability) >= (7, 0))  # Volta: fp16 tensor cores.


def _cpu_info() -> DeviceInfo:
    flags = cpu_bf16_flags()
    has = f"bf16 instructions: {', '.join(flags)}" if flags else "no bf16 instructions"
    if _forced_cpu_bf16() is False:
        has += f": {CPU_BF16_ENV}=0"  # As '1' shows: the banner says it was forced.
    return DeviceInfo("cpu", "/device:CPU:0", f"{_cpu_model()} ({has})", bool(flags),
                      fast_fp16=bool(_cpu_flags() & {"avx512_fp16", "amx_fp16"}))


def select_device(requested: str, *, policy: str) -> DeviceInfo:
    """Makes ``requested`` ('auto', 'cpu', 'gpu', 'hpu') the device TensorFlow uses.

    'auto' picks an HPU when Habana's bridge is installed and a Gaudi card is visible, else a
    GPU, else the CPU. With the bridge but no usable card it says why on stderr (one
    ``warning:`` line) and trains on what is left.

    Raises:
      UserError: when the device is missing, or the policy cannot run on it.
    """
    if requested == "auto":
        requested = _auto_device()
    reason = unsupported_reason(requested, policy)
    if reason:  # Before loading anything: 'auto' may have picked the HPU.
        raise UserError(f"policy {policy} cannot run on an {requested.upper()}: {reason}")
    if requested == "hpu":
        return load_habana()
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "gpu":
        if not gpus:
            raise UserError(
                "--device=gpu but TensorFlow sees no GPU (is a CUDA build of TensorFlow installed "
                "and the driver loaded?); use --device=cpu or --device=auto")
        return _warn_if_slow(_gpu_info(gpus[0]), policy)
    if gpus:
        tf.config.set_visible_devices([], "GPU")  # --device=cpu means no GPU at all.
    return _warn_if_slow(_cpu_info(), policy)


def _auto_device() -> str:
    """'hpu', 'gpu' or 'cpu' for --device=auto; notes why an installed bridge is not used."""
    hpu_problem = ""
    if habana_available():
        hpu_problem = _hpu_unusable_reason()
        if not hpu_problem:
            return "hpu"
    fallback = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if hpu_problem:
        warn(f"Habana's bridge is installed but {hpu_problem}; training on the "
                       f"{fallback.upper()} (--device={fallback} skips this check)")
    return fallback


def check_jit_compile(info: DeviceInfo, jit_compile: bool) -> None:
    """Refuses ``--jit_compile`` on an HPU: Gaudi has no XLA.

    Call it right after :func:`select_device` (``--device=auto`` may have picked the HPU).

    Raises:
      UserError: jit_compile on an HPU.
    """
    if jit_compile and info.kind == "hpu":
        raise UserError(
            "--jit_compile compiles the forward and backward pass with XLA, which Gaudi does not "
            f"have (this run uses {info.description}; Habana's bridge compiles graphs for the HPU "
            "itself); drop --jit_compile, or use it with --device=cpu or --device=gpu")


def slower_than_float32(info: DeviceInfo, policy: str) -> str:
    """Why ``policy`` will run slower than float32 on this device ('' when it will not)."""
    if policy == "mixed_bfloat16" and not info.fast_bf16:
        hardware = "a CPU without AMX or AVX512-BF16" if info.kind == "cpu" else \
            "a GPU older than compute capability 8.0"
        return (f"mixed_bfloat16 on {hardware} ({info.description}) emulates bf16 and will be "
                "slower than float32; use --policy=float32 here")
    if policy == "mixed_float16" and not info.fast_fp16:
        hardware = "a CPU without AVX512-FP16" if info.kind == "cpu" else \
            "a GPU older than compute capability 7.0"
        return (f"mixed_float16 on {hardware} ({info.description}) has no fast float16 math "
                "and will be slower than float32; use --policy=float32 (or mixed_bfloat16 "
                "where bf16 is fast)")
    return ""


def _warn_if_slow(info: DeviceInfo, policy: str) -> DeviceInfo:
    reason = slower_than_float32(info, policy)
    if reason:
        warn(reason)
    return info


def bytes_read() -> Optional[int]:
    """Bytes this process has read so far (``rchar`` of ``/proc/self/io``; None elsewhere).

    ``rchar`` counts every byte ``read`` and ``pread`` returned, from the page cache or the
    disk alike, so it measures what the process asked for (records, checkpoints), not what
    the disk happened to have cached.
    """
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
