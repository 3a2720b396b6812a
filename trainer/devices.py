"""Device selection: CPU, GPU or Intel Gaudi (HPU), with clear errors where one is missing.

Call :func:`select_device` before any TensorFlow op runs: hiding GPUs and loading Habana's
bridge both have to happen before the runtime initialises its devices.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import sys
from typing import Optional

from trainer.compat import tf
from trainer.config import unsupported_reason
from trainer.errors import UserError

HABANA_MODULE = "habana_frameworks.tensorflow"
HABANA_TF_VERSION = "2.15.0"
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Module-level so tests can point it at a fake cpuinfo.
CPUINFO_PATH = "/proc/cpuinfo"


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


def _cpu_flags(cpuinfo_path: Optional[str] = None) -> set:
    """Every instruction-set flag of the first CPU in /proc/cpuinfo (empty if unreadable)."""
    try:
        with open(cpuinfo_path or CPUINFO_PATH) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_flags(cpuinfo_path: Optional[str] = None) -> list:
    """The CPU's bf16 instruction-set flags (AMX, AVX512-BF16) found in /proc/cpuinfo."""
    flags = _cpu_flags(cpuinfo_path)
    return [flag for flag in _CPU_BF16_FLAGS if flag in flags]


def _cpu_model(cpuinfo_path: Optional[str] = None) -> str:
    try:
        with open(cpuinfo_path or CPUINFO_PATH) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def habana_available() -> bool:
    """True when Habana's bridge is installed (without importing it)."""
    try:
        return importlib.util.find_spec(HABANA_MODULE) is not None
    except ModuleNotFoundError:
        return False


def _habana_missing_message(reason: str) -> str:
    return (
        f"--device=hpu needs Habana's TensorFlow bridge, but {reason}. The bridge is the "
        f"package habana-tensorflow (import {HABANA_MODULE}); it supports only TensorFlow "
        f"{HABANA_TF_VERSION} on Python 3.8 or 3.10, and this is TensorFlow {tf.__version__} on "
        f"Python {sys.version_info.major}.{sys.version_info.minor}. Install the Gaudi stack as "
        "BUILD.md ('Gaudi set-up') describes, or choose --device=cpu or --device=gpu.")


def load_habana() -> DeviceInfo:
    """Imports Habana's bridge, calls ``load_habana_module()`` and finds an HPU device."""
    if tf.__version__ != HABANA_TF_VERSION:
        raise UserError(_habana_missing_message(
            f"TensorFlow {tf.__version__} is installed and the bridge refuses any version "
            f"but {HABANA_TF_VERSION}"))
    try:
        habana = importlib.import_module(HABANA_MODULE)
    except ImportError as error:
        raise UserError(_habana_missing_message(f"importing it failed ({error})")) from None
    habana.load_habana_module()
    # Physical, not logical, devices: listing logical ones starts the TensorFlow runtime, and
    # a multi-worker strategy (HPUStrategy) must be created before that happens.
    hpus = tf.config.list_physical_devices("HPU")
    if not hpus:
        raise UserError(
            "--device=hpu: Habana's bridge loaded but TensorFlow sees no HPU device; check that "
            "the Gaudi driver is loaded (hl-smi lists the cards) and that HABANA_VISIBLE_MODULES "
            "does not hide them")
    device_type = getattr(habana, "get_device_type", lambda: "Gaudi")()
    name = "/device:HPU:0"
    return DeviceInfo("hpu", name, f"Intel {device_type} HPU ({len(hpus)} visible)", True)


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
    return DeviceInfo("cpu", "/device:CPU:0", f"{_cpu_model()} ({has})", bool(flags),
                      fast_fp16=bool(_cpu_flags() & {"avx512_fp16", "amx_fp16"}))


def select_device(requested: str, *, policy: str) -> DeviceInfo:
    """Makes ``requested`` ('auto', 'cpu', 'gpu', 'hpu') the device TensorFlow uses.

    'auto' picks an HPU when Habana's bridge is installed, else a GPU, else the CPU.

    Raises:
      UserError: when the device is missing, or the policy cannot run on it.
    """
    if requested == "auto":
        if habana_available():
            requested = "hpu"
        else:
            requested = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
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
        logging.warning("%s", reason)
    return info
