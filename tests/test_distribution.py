"""Distributed training: TF_CONFIG from launcher variables, strategies, and 2-worker runs.

The multi-process tests start two CPU workers on localhost (through ``trainer.launch`` and
through Open MPI's ``mpirun``) and compare their weights with a single-process run of the same
global batch and seed. The HPU tests are *wiring* tests: a stand-in ``habana_frameworks``
package checks that we ask for Habana's strategy and set its environment; they prove nothing
about real Gaudi hardware.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, run_cli, user_stderr_lines

from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.runtime import devices, distribution, worker_env

# Two processes sum the two halves of each global batch's gradient in another order than one
# process does: float32 round-off, nothing more. Checksums are sums of ~13k weights of O(0.1).
SINGLE_VS_MULTI_RTOL = 1e-5
TRAIN_ARGS = ("--dataset=synthetic", "--synthetic_examples=1024", "--model_args=units=16",
              "--epochs=1", "--batch_size=64", "--policy=float32", "--device=cpu",
              "--progress=none", "--seed=3")
# mpirun forwards each rank's output in chunks, so another rank's text can follow a line
# with no newline between: match the number itself, not "up to the next space".
WORKER_LINE = re.compile(r"worker (\d)/2[^:]*: global_step (\d+) "
                         r"weights_checksum (-?\d+\.\d+(?:e[-+]?\d+)?)")
LAUNCHER_VARS = [name for names in worker_env.RANK_VARIABLES.values() for name in names]


@pytest.fixture
def clean_env(monkeypatch):
    """No cluster variables from the environment pytest runs in."""
    for name in LAUNCHER_VARS + ["TF_CONFIG", "HLS_MODULE_ID", "HABANA_VISIBLE_MODULES",
                                 "TF_BF16_CONVERSION"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def ompi(rank, size, local_rank, local_size) -> dict:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size)}


def free_port_range(count: int) -> int:
    """A base port whose next ``count`` ports are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


# ---------------------------------------------------------------- TF_CONFIG from the launcher

def test_tf_config_from_mpirun_variables_two_boxes():
    # mpirun -np 16 -H ip1:8,ip2:8: rank 11 is local rank 3 on the second box.
    rank = worker_env.launcher_rank(ompi(11, 16, 3, 8))
    tf_config = worker_env.derive_tf_config(rank, worker_hosts="10.0.0.1:8,10.0.0.2:8",
                                            base_port=2410)
    workers = tf_config["cluster"]["worker"]
    assert len(workers) == 16
    assert workers[0] == "10.0.0.1:2410" and workers[7] == "10.0.0.1:2417"
    assert workers[8] == "10.0.0.2:2410" and workers[11] == "10.0.0.2:2413"
    assert tf_config["task"] == {"type": "worker", "index": 11}


def test_tf_config_single_box_defaults_to_localhost():
    rank = worker_env.launcher_rank({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2",
                                     "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"})
    assert rank.source == "horovodrun"
    tf_config = worker_env.derive_tf_config(rank, worker_hosts="", base_port=7850)
    assert tf_config["cluster"]["worker"] == ["localhost:7850", "localhost:7851"]
    assert tf_config["task"]["index"] == 1


def test_prepare_sets_tf_config_once(clean_env):
    env = ompi(1, 2, 1, 2)
    distribution.prepare(TrainConfig(distribution="multi_worker", base_port=9000), env)
    assert json.loads(env["TF_CONFIG"])["cluster"]["worker"] == ["localhost:9000",
                                                                  "localhost:9001"]
    env["TF_CONFIG"] = "kept"  # A TF_CONFIG already there is the user's: never overwritten.
    distribution.prepare(TrainConfig(distribution="multi_worker"), env)
    assert env["TF_CONFIG"] == "kept"


@pytest.mark.parametrize("hosts, rank, message", [
    ("a:0", (0, 2, 0, 2), "slots must be a positive integer"),
    ("a:x", (0, 2, 0, 2), "slots must be a positive integer"),
    ("a,,b", (0, 2, 0, 1), "is not a host name"),
    ("bad host", (0, 2, 0, 2), "is not a host name"),
    ("a:1", (0, 2, 0, 2), "has 1 worker slots but the launcher started 2"),
    ("a:1,b:1", (1, 2, 1, 2), "the launcher made it local rank 1"),
    ("", (3, 16, 3, 8), "only 8 on this machine"),
])
def test_bad_worker_hosts_named(hosts, rank, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        worker_env.derive_tf_config(worker_env.Rank(*rank, "mpirun"), worker_hosts=hosts,
                                    base_port=7850)
    assert "\n" not in str(error.value)


def test_launcher_job_with_single_process_distribution_refused(clean_env):
    with pytest.raises(UserError, match="--distribution=multi_worker"):
        distribution.prepare(TrainConfig(distribution="none"), ompi(0, 2, 0, 2))


def test_all_local_mpirun_job_warns_on_the_chief_that_others_can_reach_it(monkeypatch):
    # mpirun's ranks on one host: TF_CONFIG of localhost addresses, and this machine has an
    # interface besides lo, through which their servers (listening on every one) are reached.
    monkeypatch.setattr(worker_env, "other_interfaces", lambda: ["eth0"])
    rank = worker_env.Rank(0, 2, 0, 2, "mpirun")
    chief = worker_env.derive_tf_config(rank, worker_hosts="", base_port=7850)
    warning = worker_env.exposure_warning(chief, ompi(0, 2, 0, 2))
    assert warning.startswith("the 2 workers of this job are all on this machine, but their "
                              "TensorFlow servers (ports 7850, 7851) listen on every interface")
    assert "unshare --net" in warning and "\n" not in warning
    other = dict(chief, task={"type": "worker", "index": 1})
    assert worker_env.exposure_warning(other, ompi(1, 2, 1, 2)) is None  # Said once.
    # trainer.launch confines its workers, or says itself that it cannot.
    assert worker_env.exposure_warning(chief, {"TRAINER_RANK": "0"}) is None
    hosts = {"cluster": {"worker": ["10.0.0.1:7850", "10.0.0.2:7850"]}, "task": chief["task"]}
    assert worker_env.exposure_warning(hosts, {}) is None  # Several hosts: docs say it.
    monkeypatch.setattr(worker_env, "other_interfaces", lambda: [])
    assert worker_env.exposure_warning(chief, {}) is None  # Loopback only: nothing exposed.


def test_resolve_auto():
    assert distribution.resolve("auto", "cpu", {}) == "none"
    assert distribution.resolve("auto", "cpu", ompi(0, 2, 0, 2)) == "multi_worker"
    two = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker",
                                                                     "index": 0}})
    assert distribution.resolve("auto", "cpu", {"TF_CONFIG": two}) == "multi_worker"
    assert distribution.resolve("auto", "hpu", ompi(0, 8, 0, 8)) == "hpu"
    assert distribution.resolve("auto", "hpu", {}) == "none"
    assert distribution.resolve("mirrored", "cpu", {}) == "mirrored"


def test_port_check(clean_env):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .* already in use.*--base_port"):
            worker_env.check_port_free(f"localhost:{port}")
    worker_env.check_port_free(f"localhost:{port}")  # Free again once released.


def test_single_worker_multi_worker_strategy_in_process(clean_env, make_config):
    config = make_config(distribution="multi_worker", batch_size=32)
    cluster = distribution.setup(config, devices.DeviceInfo("cpu", "/device:CPU:0", "cpu", False))
    assert isinstance(cluster.strategy, tf.distribute.MultiWorkerMirroredStrategy)
    assert cluster.strategy.num_replicas_in_sync == 1
    assert (cluster.is_chief, cluster.num_workers, cluster.worker_index) == (True, 1, 0)
    options = cluster.strategy.extended._communication_options  # What we asked TF for.
    assert options.timeout_seconds == distribution.COLLECTIVE_TIMEOUT_S


def test_mirrored_strategy_on_local_devices(clean_env, make_config):
    cpu = devices.DeviceInfo("cpu", "/device:CPU:0", "cpu", False)
    cluster = distribution.setup(make_config(distribution="mirrored"), cpu)
    assert isinstance(cluster.strategy, tf.distribute.MirroredStrategy)
    assert cluster.strategy.num_replicas_in_sync == 1  # No GPU here: the CPU alone.
    assert (cluster.kind, cluster.is_chief, cluster.num_workers) == ("mirrored", True, 1)
    with pytest.raises(UserError, match="--distribution=hpu under mpirun"):
        distribution.setup(make_config(distribution="mirrored"),
                         devices.DeviceInfo("hpu", "/device:HPU:0", "hpu", True))


def test_dead_peer_error_becomes_one_line(clean_env):
    message = ("Graph execution error:\n\nCollective ops is aborted by: Socket closed\n"
               "Additional GRPC error information from remote target /job:worker/task:1")
    with pytest.raises(tf.errors.UnavailableError):  # One process: not ours to translate.
        with distribution.worker_failures_as_errors():
            raise tf.errors.UnavailableError(None, None, message)
    clean_env.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(distribution.WorkerLostError) as error:
        with distribution.worker_failures_as_errors():
            raise tf.errors.UnavailableError(None, None, message)
    text = str(error.value)
    assert "\n" not in text and "Collective ops is aborted by: Socket closed" in text
    assert text.startswith("another worker of this job stopped responding")


# ---------------------------------------------------------------- bad input: one line each

def _one_error_line(result) -> str:
    lines = user_stderr_lines(result.stderr)
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_cli_batch_not_divisible_by_replicas():
    tf_config = json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                            "task": {"type": "worker", "index": 0}})
    result = run_cli(*TRAIN_ARGS, "--distribution=multi_worker", "--batch_size=33",
                     env={"TF_CONFIG": tf_config}, timeout=120)
    line = _one_error_line(result)
    assert "--batch_size=33" in line and "2 replicas" in line and "--batch_size=32" in line


def test_cli_bad_worker_hosts():
    result = run_cli(*TRAIN_ARGS, "--distribution=multi_worker", "--worker_hosts=node1:eight",
                     env=ompi(0, 2, 0, 2), timeout=120)
    line = _one_error_line(result)
    assert "'node1:eight'" in line and "host:slots" in line


def test_cli_port_in_use():
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        tf_config = json.dumps({"cluster": {"worker": [f"localhost:{port}"]},
                                "task": {"type": "worker", "index": 0}})
        result = run_cli(*TRAIN_ARGS, "--distribution=multi_worker",
                         env={"TF_CONFIG": tf_config}, timeout=120)
    line = _one_error_line(result)
    assert f"port {port}" in line and "already in use" in line and "--base_port" in line


# ---------------------------------------------------------------- two workers, same answer

@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, same global batch and seed."""
    path = tmp_path_factory.mktemp("single") / "metrics.json"
    result = run_cli(*TRAIN_ARGS, "--distribution=none", f"--metrics_file={path}", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text())


def _check_two_workers(output: str, metrics_path, single: dict) -> None:
    workers = {int(i): (int(step), float(checksum))
               for i, step, checksum in WORKER_LINE.findall(output)}
    assert sorted(workers) == [0, 1], output[-3000:]
    # Gradients are all-reduced before every update: both replicas hold the same weights.
    assert workers[0] == workers[1]
    chief = json.loads(metrics_path.read_text())  # Only the chief writes the metrics file.
    assert chief["num_workers"] == 2
    assert (chief["global_step"], chief["weights_checksum"]) == workers[0]
    assert chief["global_step"] == single["global_step"] == 14  # 922 // 64 train batches.
    assert chief["weights_checksum"] == pytest.approx(single["weights_checksum"],
                                                      rel=SINGLE_VS_MULTI_RTOL)


def test_two_workers_through_launch_match_single_process(tmp_path, single_process):
    metrics = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", "run.py",
         *TRAIN_ARGS, "--distribution=multi_worker", f"--metrics_file={metrics}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "[w0] " in result.stdout and "[w1] " in result.stdout
    _check_two_workers(result.stdout, metrics, single_process)


MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="Open MPI's mpirun is not installed (make setup)")
def test_two_workers_through_mpirun_match_single_process(tmp_path, single_process):
    metrics = tmp_path / "metrics.json"
    root_flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS + ["TF_CONFIG"]}
    result = subprocess.run(
        [MPIRUN, *root_flags, "--oversubscribe", "-np", "2", "-x", "TF_CPP_MIN_LOG_LEVEL=2",
         sys.executable, "run.py", *TRAIN_ARGS, "--distribution=multi_worker",
         f"--base_port={free_port_range(2)}", f"--metrics_file={metrics}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    _check_two_workers(result.stdout, metrics, single_process)


# ---------------------------------------------------------------- a worker dies mid-run

def test_killed_worker_stops_the_job_and_chief_checkpoint_survives(tmp_path):
    model_dir = tmp_path / "run"
    args = [a for a in TRAIN_ARGS if not a.startswith(("--epochs", "--synthetic_examples"))]
    command = [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--grace_s=5", "--",
               "run.py", *args, "--synthetic_examples=20000", "--epochs=200",
               "--steps_per_loop=10", "--checkpoint_every=20", f"--model_dir={model_dir}",
               "--distribution=multi_worker"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not tf.train.latest_checkpoint(str(model_dir / "checkpoints")):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        pid = next(int(m.group(1)) for line in list(lines)
                   if (m := re.search(r"\[launch\] worker 1: pid (\d+)", line)))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)  # Bounded: no survivor blocks in a collective forever.
        stopped_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    reader.join(timeout=5)
    output = "".join(lines)
    assert proc.returncode != 0
    assert stopped_after < 30, stopped_after
    assert "[launch] worker 1 was killed by SIGKILL" in output
    # The chief's newest checkpoint is whole: a one-worker job resumes from it.
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    saved_step = int(re.search(r"ckpt-(\d+)$", latest).group(1))
    assert saved_step >= 20 and saved_step % 10 == 0
    result = run_cli(*args, "--synthetic_examples=20000", "--epochs=1", "--steps_per_loop=10",
                     f"--model_dir={model_dir}", "--distribution=multi_worker", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {saved_step}" in result.stdout


def _launch_two(model_dir, *extra, **popen):
    args = [a for a in TRAIN_ARGS if not a.startswith(("--epochs", "--synthetic_examples"))]
    command = [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", "run.py", *args,
               "--synthetic_examples=16384", "--epochs=2", "--steps_per_loop=10",
               "--checkpoint_every=20", f"--model_dir={model_dir}", "--distribution=multi_worker",
               *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), **popen)


def test_sigterm_stops_every_worker_at_one_step_and_the_job_resumes_exactly(tmp_path):
    straight = _launch_two(tmp_path / "straight")
    reference = {int(i): (int(s), float(c)) for i, s, c in
                 WORKER_LINE.findall(straight.communicate(timeout=300)[0])}
    assert straight.returncode == 0 and len(reference) == 2

    model_dir = tmp_path / "stopped"
    proc = _launch_two(model_dir)
    deadline = time.monotonic() + 180
    while not (model_dir / "checkpoints" / "ckpt-40.index").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # The launcher forwards it to both workers.
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    step = int(re.search(r"\[w0\] stopped by SIGTERM at step (\d+)", output).group(1))
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{step}")

    resumed = _launch_two(model_dir)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"at step {step}" in output
    workers = {int(i): (int(s), float(c)) for i, s, c in WORKER_LINE.findall(output)}
    # Both workers restored the chief's checkpoint; the input position follows from the step,
    # so the resumed job ends exactly where the uninterrupted one did.
    assert workers == reference


# ---------------------------------------------------------------- HPU wiring (stand-in)

@pytest.fixture
def habana_stand_in(tmp_path, clean_env):
    """A fake ``habana_frameworks.tensorflow`` whose ``HPUStrategy`` is a recording
    MultiWorkerMirroredStrategy; the fake HPU device appears once the bridge is loaded."""
    package = tmp_path / "habana_frameworks" / "tensorflow" / "distribute"
    package.mkdir(parents=True)
    (tmp_path / "habana_frameworks" / "__init__.py").write_text("")
    (package.parent / "__init__.py").write_text(
        "import os\nloaded = []\n"
        "def load_habana_module():\n"
        "    loaded.append(os.environ.get('HLS_MODULE_ID'))\n")
    (package / "__init__.py").write_text(
        "import tensorflow as tf\nimport habana_frameworks.tensorflow as bridge\n"
        "created = []\n"
        "class HPUStrategy(tf.distribute.MultiWorkerMirroredStrategy):\n"
        "    def __init__(self, communication_options=None, server=None):\n"
        "        created.append({'after_load': bool(bridge.loaded),\n"
        "                        'options': communication_options})\n"
        "        super().__init__(communication_options=communication_options)\n")
    for name in [n for n in sys.modules if n.startswith("habana_frameworks")]:
        clean_env.delitem(sys.modules, name)
    clean_env.syspath_prepend(str(tmp_path))
    # A visible GAUDI2 card for the driver check that runs before the bridge loads.
    (tmp_path / "device_type").write_text("GAUDI2\n")
    (tmp_path / "accel0").write_text("")
    clean_env.setattr(devices, "HABANA_DRIVER_FILE", str(tmp_path / "device_type"))
    clean_env.setattr(devices, "HABANA_DEVICE_NODES", str(tmp_path / "accel[0-9]*"))
    clean_env.setattr(tf, "__version__", devices.HABANA_TF_VERSION)
    real = tf.config.list_physical_devices

    def list_physical_devices(kind=None):
        bridge = sys.modules.get(devices.HABANA_MODULE)
        if kind == "HPU":
            return [tf.config.PhysicalDevice("/physical_device:HPU:0", "HPU")] \
                if bridge is not None and bridge.loaded else []
        return real(kind)

    clean_env.setattr(tf.config, "list_physical_devices", list_physical_devices)
    yield clean_env
    for name in [n for n in sys.modules if n.startswith("habana_frameworks")]:
        del sys.modules[name]


def test_hpu_wiring_strategy_requested_after_bridge_loads(habana_stand_in, make_config):
    config = make_config(device="hpu", distribution="hpu", policy="mixed_bfloat16")
    distribution.prepare(config)
    device = devices.select_device("hpu", policy=config.policy)
    cluster = distribution.setup(config, device)
    import habana_frameworks.tensorflow.distribute as hpu_distribute

    assert device.kind == "hpu" and cluster.kind == "hpu"
    assert len(hpu_distribute.created) == 1
    assert isinstance(cluster.strategy, hpu_distribute.HPUStrategy)
    assert hpu_distribute.created[0]["after_load"]  # HPUStrategy only after load_habana_module.
    assert hpu_distribute.created[0]["options"].timeout_seconds == \
        distribution.COLLECTIVE_TIMEOUT_S
    assert cluster.is_chief and cluster.strategy.num_replicas_in_sync == 1


def test_hpu_wiring_module_id_per_local_rank(habana_stand_in, make_config):
    config = make_config(device="hpu", distribution="hpu", policy="mixed_bfloat16",
                         worker_hosts="box1:4,box2:4")
    for local_rank in range(4):  # The second box of two.
        env = ompi(4 + local_rank, 8, local_rank, 4)
        distribution.prepare(config, env)
        assert env["HLS_MODULE_ID"] == str(local_rank)
        assert json.loads(env["TF_CONFIG"])["task"]["index"] == 4 + local_rank
    env = dict(ompi(2, 4, 2, 4), HABANA_VISIBLE_MODULES="4,5,6,7")
    distribution.prepare(config, env)
    assert env["HLS_MODULE_ID"] == "6"  # The local rank's entry of the visible cards.
    env = dict(ompi(2, 4, 2, 4), HLS_MODULE_ID="1")
    distribution.prepare(config, env)
    assert env["HLS_MODULE_ID"] == "1"  # Set by the user: kept.
    with pytest.raises(UserError, match="HABANA_VISIBLE_MODULES='0,1' lists 2 cards but 4"):
        distribution.prepare(config, dict(ompi(0, 4, 0, 4), HABANA_VISIBLE_MODULES="0,1"))
    # The card is chosen before the bridge loads (it reads HLS_MODULE_ID when loading).
    habana_stand_in.setattr(os, "environ", dict(os.environ, **ompi(0, 1, 0, 1)))
    distribution.prepare(config)
    devices.select_device("hpu", policy=config.policy)
    import habana_frameworks.tensorflow as bridge

    assert bridge.loaded == ["0"]


def test_hpu_wiring_bf16_conversion_with_mixed_policy_refused(habana_stand_in, make_config):
    env = {"TF_BF16_CONVERSION": "1"}
    with pytest.raises(UserError, match="TF_BF16_CONVERSION.*mixed_bfloat16.*unset"):
        distribution.prepare(make_config(device="hpu", policy="mixed_bfloat16"), env)
    distribution.prepare(make_config(device="hpu", policy="float32"), env)  # Habana's own mode.
    result = run_cli(*[a for a in TRAIN_ARGS if not a.startswith("--policy")],
                     "--policy=mixed_bfloat16", env={"TF_BF16_CONVERSION": "1"}, timeout=120)
    assert "TF_BF16_CONVERSION" in _one_error_line(result)


def test_hpu_wiring_distribution_hpu_needs_hpu_device(clean_env, make_config):
    with pytest.raises(UserError, match="--distribution=hpu needs Habana's HPU device"):
        distribution.setup(make_config(distribution="hpu"),
                         devices.DeviceInfo("cpu", "/device:CPU:0", "cpu", False))
