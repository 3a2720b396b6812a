"""Device selection: CPU bf16 detection, the Gaudi driver check, and the HPU path.

Habana's real bridge is tested in tests/test_hpu_bridge.py (the TF 2.15 lane): it imports,
and with no Gaudi card here it gives the CPU fallback and the one-line errors. What it cannot
show without a card is a *visible* HPU device: the ``test_visible_hpu_*`` tests put a stand-in
package named ``habana_frameworks.tensorflow`` on ``sys.path``, with fake driver files and a
fake HPU device, and check that our code loads it, names the card and refuses what Gaudi
cannot run. They test our wiring, not HPU support.
"""

import sys
import textwrap

import pytest
from conftest import SLOW_BF16_CPU_WARNING, run_cli, user_stderr_lines

from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.errors import ConfigError, UserError
from trainer.runtime import devices

STAND_IN = textwrap.dedent('''
    """Stand-in for Habana's bridge: records calls, 'registers' an HPU when loaded."""
    LOAD_CALLS = []

    def load_habana_module():
        LOAD_CALLS.append(True)
''')


def _forget_habana():
    for name in [n for n in sys.modules
                 if n == "habana_frameworks" or n.startswith("habana_frameworks.")]:
        del sys.modules[name]


@pytest.fixture
def gaudi_files(tmp_path, monkeypatch):
    """Points the driver check at fake files: ``gaudi_files(card_type, nodes)``."""
    driver, dev = tmp_path / "sys" / "device_type", tmp_path / "dev"
    driver.parent.mkdir()
    dev.mkdir()
    monkeypatch.setattr(devices, "HABANA_DRIVER_FILE", str(driver))
    monkeypatch.setattr(devices, "HABANA_DEVICE_NODES", str(dev / "accel[0-9]*"))

    def make(card_type="GAUDI2\n", nodes=("accel0",)):
        if card_type is not None:
            driver.write_text(card_type)
        for node in nodes:
            (dev / node).write_text("")
        return str(driver)
    return make


@pytest.fixture
def stand_in(tmp_path, monkeypatch, gaudi_files):
    """Installs the stand-in bridge on sys.path, TF reporting 2.15.0, a visible GAUDI2 card
    and a fake HPU device that appears only once ``load_habana_module()`` ran; yields the
    imported stand-in."""
    package = tmp_path / "habana_frameworks"
    (package / "tensorflow").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tensorflow" / "__init__.py").write_text(STAND_IN)
    _forget_habana()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tf, "__version__", "2.15.0")
    gaudi_files()
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


# ------------------------------------------------------------------ the Gaudi driver check

def test_gaudi_card_found(gaudi_files):
    gaudi_files("GAUDI2\nsecond line ignored\n", nodes=("accel0", "accel_controlD0"))
    assert devices.gaudi_card() == ("GAUDI2", "")


def test_gaudi_card_no_driver_file(gaudi_files):
    path = gaudi_files(card_type=None)
    card, problem = devices.gaudi_card()
    assert card == "" and problem == f"cannot read {path}: No such file or directory"


def test_gaudi_card_empty_driver_file(gaudi_files):
    path = gaudi_files(card_type="\n")
    assert devices.gaudi_card() == ("", f"{path} is empty")


def test_gaudi_card_driver_without_device_node(gaudi_files):
    gaudi_files("GAUDI\n", nodes=("accel_controlD0",))  # A control node is not a card.
    card, problem = devices.gaudi_card()
    assert card == ""
    assert problem.startswith("the driver reports a GAUDI but no device node matches ")
    assert "container" in problem


# ------------------------------------------------------------------ a visible HPU (stand-in)

def test_visible_hpu_loads_bridge_and_names_the_card(stand_in):
    info = devices.select_device("hpu", policy="mixed_bfloat16")
    assert stand_in.LOAD_CALLS == [True]
    assert (info.kind, info.name, info.fast_bf16) == ("hpu", "/device:HPU:0", True)
    assert info.description == "Intel GAUDI2 HPU (1 visible)"  # The driver's card type.


def test_visible_hpu_auto_prefers_it_without_a_note(stand_in, capsys):
    assert devices.habana_available()
    info = devices.select_device("auto", policy="float32")
    assert info.kind == "hpu" and stand_in.LOAD_CALLS == [True]
    assert capsys.readouterr().err == ""


def test_visible_hpu_auto_fp16_refused_before_loading(stand_in):
    with pytest.raises(UserError, match="no float16") as info:
        devices.select_device("auto", policy="mixed_float16")
    assert "--policy=mixed_bfloat16" in str(info.value)
    assert stand_in.LOAD_CALLS == []  # Refused before touching the bridge.


def test_visible_hpu_bridge_loads_but_no_hpu_device(stand_in, monkeypatch):
    monkeypatch.setattr(stand_in, "load_habana_module", lambda: None)  # Loads, finds nothing.
    with pytest.raises(UserError, match="sees no HPU device"):
        devices.select_device("hpu", policy="mixed_bfloat16")


def test_visible_hpu_jit_compile_refused(stand_in):
    info = devices.select_device("auto", policy="mixed_bfloat16")
    with pytest.raises(UserError) as error:
        devices.check_jit_compile(info, jit_compile=True)
    message = str(error.value)
    assert "XLA" in message and "Intel GAUDI2 HPU" in message and "drop --jit_compile" in message
    devices.check_jit_compile(info, jit_compile=False)  # No XLA asked for: fine.


# ------------------------------------------------------------------ no bridge, wrong TF

def test_jit_compile_allowed_on_cpu_and_gpu():
    for kind in ("cpu", "gpu"):
        devices.check_jit_compile(devices.DeviceInfo(kind, "d", kind, False), jit_compile=True)


def test_hpu_fp16_refused_before_the_bridge():
    with pytest.raises(UserError, match="no float16") as info:
        devices.select_device("hpu", policy="mixed_float16")
    assert "--policy=mixed_bfloat16" in str(info.value)
    with pytest.raises(ConfigError, match="--device=hpu"):
        TrainConfig(device="hpu", policy="mixed_float16")


def test_hpu_bridge_absent(monkeypatch):
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


def test_hpu_unsupported_tf_version(monkeypatch):
    monkeypatch.setattr(tf, "__version__", "2.21.0")
    with pytest.raises(UserError) as info:
        devices.select_device("hpu", policy="mixed_bfloat16")
    message = str(info.value)
    assert "TensorFlow 2.21.0 is installed" in message and "2.15.0" in message
    assert "BUILD.md" in message  # Refused before importing: the bridge raises ImportError.


def test_auto_with_bridge_on_wrong_tf_notes_it_and_uses_cpu(monkeypatch, capsys):
    monkeypatch.setattr(devices, "habana_available", lambda: True)
    monkeypatch.setattr(tf, "__version__", "2.21.0")
    real_list = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [] if kind == "GPU" else real_list(kind))
    assert devices.select_device("auto", policy="float32").kind == "cpu"
    assert capsys.readouterr().err.splitlines() == [
        "warning: Habana's bridge is installed but it needs TensorFlow 2.15.0 and this is "
        "TensorFlow 2.21.0; training on the CPU (--device=cpu skips this check)"]


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
    # These tests read the fake file: a TRAINER_CPU_BF16 the suite runs under must not win.
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)

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


def test_mixed_bf16_on_cpu_without_bf16_warns(fake_cpuinfo, capsys):
    fake_cpuinfo("")
    info = devices.select_device("cpu", policy="mixed_bfloat16")
    assert info.kind == "cpu" and not info.fast_bf16
    assert "Test CPU 9000 (no bf16 instructions)" == info.description
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 1 and "slower than float32" in warnings[0]


@pytest.mark.parametrize("extra, policy", [
    ("avx512_bf16", "mixed_bfloat16"), ("amx_bf16", "mixed_bfloat16"), ("", "float32")])
def test_no_warning_when_bf16_is_fast_or_unused(fake_cpuinfo, capsys, extra, policy):
    fake_cpuinfo(extra)
    info = devices.select_device("cpu", policy=policy)
    assert info.fast_bf16 == bool(extra)
    assert "slower than float32" not in capsys.readouterr().err


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


# ------------------------------------------------------------------ TRAINER_CPU_BF16

@pytest.mark.parametrize("extra", ["", "amx_tile amx_bf16 avx512_bf16"])
def test_cpu_bf16_forced_by_the_environment(fake_cpuinfo, monkeypatch, extra):
    path = fake_cpuinfo(extra)  # Whatever the CPU has, the variable decides.
    real = devices.cpu_bf16_flags()
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    assert devices.cpu_bf16_flags() == []
    assert devices.cpu_bf16_flags(path) == real  # An explicit file is read as it is.
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    assert devices.cpu_bf16_flags() == ["TRAINER_CPU_BF16=1"]
    monkeypatch.setenv(devices.CPU_BF16_ENV, "")  # Empty is unset: the CPU's flags.
    assert devices.cpu_bf16_flags() == real


def test_cpu_bf16_forced_to_a_bad_value_is_one_line(fake_cpuinfo, monkeypatch):
    fake_cpuinfo("amx_bf16")
    monkeypatch.setenv(devices.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError) as error:
        devices.select_device("cpu", policy="mixed_bfloat16")
    message = str(error.value)
    assert message.startswith("TRAINER_CPU_BF16='yes': set it to 0 ") and "\n" not in message


@pytest.mark.parametrize("forced, extra", [("0", "amx_bf16 avx512_bf16"), ("1", "")])
def test_select_device_as_the_forced_cpu(fake_cpuinfo, monkeypatch, capsys, forced, extra):
    fake_cpuinfo(extra)  # The opposite of what is forced.
    monkeypatch.setenv(devices.CPU_BF16_ENV, forced)
    info = devices.select_device("cpu", policy="mixed_bfloat16")
    assert info.fast_bf16 == (forced == "1")
    has = "bf16 instructions: TRAINER_CPU_BF16=1" if forced == "1" else \
        "no bf16 instructions: TRAINER_CPU_BF16=0"
    assert info.description == f"Test CPU 9000 ({has})"
    slow = devices.slower_than_float32(info, "mixed_bfloat16")
    assert capsys.readouterr().err.splitlines() == ([f"warning: {slow}"] if slow else [])
    assert bool(slow) == (forced == "0")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_cli_slow_bf16_warning_follows_the_forced_cpu(tmp_path, forced):
    """The real CLI, as on a CPU without bf16 instructions (one warning line) and with them
    (none); also keeps conftest.SLOW_BF16_CPU_WARNING, which other tests drop, in step."""
    result = run_cli("--dataset=synthetic", "--synthetic_examples=256", "--epochs=1",
                     "--batch_size=32", "--model_args=units=16", "--validation_split=0",
                     "--policy=mixed_bfloat16", "--device=cpu", "--progress=none",
                     env={devices.CPU_BF16_ENV: forced}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = user_stderr_lines(result.stderr, keep_cpu_bf16_warning=True)
    banner = [line for line in result.stdout.splitlines() if line.startswith("device: ")]
    assert len(banner) == 1, result.stdout
    if forced == "1":
        assert lines == [], result.stderr
        assert banner[0].endswith("(bf16 instructions: TRAINER_CPU_BF16=1)"), banner
    else:
        assert len(lines) == 1 and SLOW_BF16_CPU_WARNING.match(lines[0]), result.stderr
        assert "(no bf16 instructions: TRAINER_CPU_BF16=0)" in lines[0]
        assert banner[0].endswith("(no bf16 instructions: TRAINER_CPU_BF16=0)"), banner
        assert user_stderr_lines(result.stderr) == []  # What the other CLI tests see.
