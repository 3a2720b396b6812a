"""Device selection: CPU bf16 detection, and the HPU *wiring* exercised with a stand-in bridge.

There is no Gaudi here: the ``test_hpu_wiring_*`` tests put a stand-in package named
``habana_frameworks.tensorflow`` on ``sys.path`` and check that our code loads it, refuses
fp16, and explains clearly when the bridge is missing or the TF version is wrong. They test
our wiring, not HPU support.
"""

import logging
import sys
import textwrap

import pytest

from trainer import devices
from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.errors import ConfigError, UserError

STAND_IN = textwrap.dedent('''
    """Stand-in for Habana's bridge: records calls, 'registers' an HPU when loaded."""
    LOAD_CALLS = []

    def load_habana_module():
        LOAD_CALLS.append(True)

    def get_device_type():
        return "GAUDI2"
''')


def _forget_habana():
    for name in [n for n in sys.modules if n == "habana_frameworks" or n.startswith("habana_frameworks.")]:
        del sys.modules[name]


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Installs the stand-in bridge on sys.path, TF reporting 2.15.0, and a fake HPU device
    that appears only once ``load_habana_module()`` ran; yields the imported stand-in."""
    package = tmp_path / "habana_frameworks"
    (package / "tensorflow").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tensorflow" / "__init__.py").write_text(STAND_IN)
    _forget_habana()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tf, "__version__", "2.15.0")
    real_list = tf.config.list_physical_devices

    def list_physical_devices(device_type=None):
        if device_type == "HPU":
            bridge = sys.modules.get(devices.HABANA_MODULE)
            loaded = bridge is not None and bridge.LOAD_CALLS
            return [tf.config.PhysicalDevice("/physical_device:HPU:0", "HPU")] if loaded else []
        return real_list(device_type)

    monkeypatch.setattr(tf.config, "list_physical_devices", list_physical_devices)
    import habana_frameworks.tensorflow as bridge  # noqa: E402 - the stand-in
    yield bridge
    _forget_habana()


def test_hpu_wiring_loads_bridge_and_finds_device(stand_in):
    info = devices.select_device("hpu", policy="mixed_bfloat16")
    assert stand_in.LOAD_CALLS == [True]
    assert (info.kind, info.name, info.fast_bf16) == ("hpu", "/device:HPU:0", True)
    assert "GAUDI2" in info.description


def test_hpu_wiring_auto_prefers_hpu(stand_in):
    assert devices.habana_available()
    info = devices.select_device("auto", policy="float32")
    assert info.kind == "hpu" and stand_in.LOAD_CALLS == [True]


def test_hpu_wiring_fp16_refused(stand_in):
    with pytest.raises(UserError, match="no float16") as info:
        devices.select_device("hpu", policy="mixed_float16")
    assert "--policy=mixed_bfloat16" in str(info.value)
    assert stand_in.LOAD_CALLS == []  # Refused before touching the bridge.
    with pytest.raises(ConfigError, match="--device=hpu"):
        TrainConfig(device="hpu", policy="mixed_float16")


def test_hpu_wiring_no_hpu_device(stand_in, monkeypatch):
    monkeypatch.setattr(stand_in, "load_habana_module", lambda: None)  # Loads, finds nothing.
    with pytest.raises(UserError, match="sees no HPU device"):
        devices.select_device("hpu", policy="mixed_bfloat16")


def test_hpu_wiring_bridge_absent(monkeypatch):
    _forget_habana()
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)  # Import now fails.
    monkeypatch.setattr(tf, "__version__", "2.15.0")
    assert not devices.habana_available()
    with pytest.raises(UserError) as info:
        devices.select_device("hpu", policy="mixed_bfloat16")
    message = str(info.value)
    for expected in ("habana-tensorflow", "importing it failed", "BUILD.md", "--device=cpu",
                     "2.15.0"):
        assert expected in message
    assert "\n" not in message


def test_hpu_wiring_unsupported_tf_version(stand_in, monkeypatch):
    monkeypatch.setattr(tf, "__version__", "2.21.0")
    with pytest.raises(UserError) as info:
        devices.select_device("hpu", policy="mixed_bfloat16")
    message = str(info.value)
    assert "TensorFlow 2.21.0 is installed" in message and "2.15.0" in message
    assert "BUILD.md" in message
    assert stand_in.LOAD_CALLS == []  # The real bridge would raise ImportError on import.


def test_auto_without_bridge_or_gpu_is_cpu(monkeypatch):
    monkeypatch.setattr(devices, "habana_available", lambda: False)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert devices.select_device("auto", policy="float32").kind == "cpu"


def test_gpu_requested_without_gpu(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    with pytest.raises(UserError, match="no GPU"):
        devices.select_device("gpu", policy="mixed_bfloat16")


# ------------------------------------------------------------------ CPU bf16 detection

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Test CPU 9000
flags\t\t: fpu vme sse sse2 avx avx2 avx512f {extra}

processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu vme sse sse2 avx avx2 avx512f {extra}
"""


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    def write(extra):
        path = tmp_path / "cpuinfo"
        path.write_text(CPUINFO.format(extra=extra))
        monkeypatch.setattr(devices, "CPUINFO_PATH", str(path))
        return str(path)
    return write


@pytest.mark.parametrize("extra, expected", [
    ("", []),
    ("avx512_bf16", ["avx512_bf16"]),
    ("amx_tile amx_bf16 amx_int8 avx512_bf16", ["amx_bf16", "avx512_bf16"]),
    ("avx512_bf16x", []),  # Whole flags only.
])
def test_cpu_bf16_flags(fake_cpuinfo, extra, expected):
    path = fake_cpuinfo(extra)
    assert devices.cpu_bf16_flags() == expected
    assert devices.cpu_bf16_flags(path) == expected


def test_cpu_bf16_flags_unreadable(tmp_path):
    assert devices.cpu_bf16_flags(str(tmp_path / "absent")) == []


def test_mixed_bf16_on_cpu_without_bf16_warns(fake_cpuinfo, caplog):
    fake_cpuinfo("")
    with caplog.at_level(logging.WARNING):
        info = devices.select_device("cpu", policy="mixed_bfloat16")
    assert info.kind == "cpu" and not info.fast_bf16
    assert "Test CPU 9000 (no bf16 instructions)" == info.description
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slower than float32" in warnings[0]


@pytest.mark.parametrize("extra, policy", [
    ("avx512_bf16", "mixed_bfloat16"), ("amx_bf16", "mixed_bfloat16"), ("", "float32")])
def test_no_warning_when_bf16_is_fast_or_unused(fake_cpuinfo, caplog, extra, policy):
    fake_cpuinfo(extra)
    with caplog.at_level(logging.WARNING):
        info = devices.select_device("cpu", policy=policy)
    assert info.fast_bf16 == bool(extra)
    assert not [r for r in caplog.records if "slower than float32" in r.getMessage()]


@pytest.mark.parametrize("info, policy, slow", [
    (devices.DeviceInfo("cpu", "c", "cpu", fast_bf16=True), "mixed_bfloat16", False),
    (devices.DeviceInfo("cpu", "c", "cpu", fast_bf16=False), "mixed_bfloat16", True),
    (devices.DeviceInfo("cpu", "c", "cpu", fast_bf16=True), "mixed_float16", True),
    (devices.DeviceInfo("cpu", "c", "cpu", fast_bf16=True, fast_fp16=True), "mixed_float16",
     False),
    (devices.DeviceInfo("gpu", "g", "T4 (7.5)", fast_bf16=False, fast_fp16=True),
     "mixed_bfloat16", True),
    (devices.DeviceInfo("gpu", "g", "T4 (7.5)", fast_bf16=False, fast_fp16=True),
     "mixed_float16", False),
    (devices.DeviceInfo("gpu", "g", "P100 (6.0)", fast_bf16=False), "float32", False),
])
def test_policy_slower_than_float32_is_named(info, policy, slow):
    reason = devices.slower_than_float32(info, policy)
    assert bool(reason) == slow
    if slow:
        assert policy in reason and "slower than float32" in reason
