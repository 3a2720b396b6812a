"""The local launcher: per-worker TF_CONFIG, prefixed output, failure handling (no TensorFlow).

Workers here are tiny Python scripts, so these tests take seconds; the real two-worker
training runs are in test_distribute.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from trainer import launch

REPORT = """
import json, os
tf_config = json.loads(os.environ["TF_CONFIG"])
print(tf_config["task"]["index"], os.environ["TRAINER_RANK"], os.environ["TRAINER_WORLD_SIZE"],
      os.environ["TRAINER_LOCAL_RANK"], ",".join(tf_config["cluster"]["worker"]))
"""


def script(tmp_path, body: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_each_worker_gets_its_task_and_prefixed_output(tmp_path):
    out = io.StringIO()
    status = launch.launch([script(tmp_path, REPORT)], num_workers=3, out=out)
    assert status == 0
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("[launch]")]
    assert len(lines) == 3
    by_worker = {line[:4]: line[5:].split() for line in lines}
    assert sorted(by_worker) == ["[w0]", "[w1]", "[w2]"]
    clusters = {fields[4] for fields in by_worker.values()}
    assert len(clusters) == 1  # Every worker sees the same cluster ...
    ports = [int(address.rsplit(":", 1)[1]) for address in clusters.pop().split(",")]
    assert len(set(ports)) == 3  # ... of three distinct localhost ports.
    for prefix, (task, rank, size, local_rank, _) in by_worker.items():
        assert task == rank == local_rank == prefix[2] and size == "3"


def test_base_port_gives_consecutive_ports(tmp_path):
    out = io.StringIO()
    assert launch.launch([script(tmp_path, REPORT)], num_workers=2, base_port=23900, out=out) == 0
    assert "localhost:23900,localhost:23901" in out.getvalue()


def test_failing_worker_stops_the_others(tmp_path):
    body = """
    import os, sys, time
    if os.environ["TRAINER_RANK"] == "1":
        sys.exit(3)
    time.sleep(120)  # Worker 0 would wait for its peer forever.
    """
    out = io.StringIO()
    start = time.monotonic()
    status = launch.launch([script(tmp_path, body)], num_workers=2, grace_s=5, out=out)
    assert status == 3
    assert time.monotonic() - start < 20
    text = out.getvalue()
    assert "[launch] worker 1 exited with code 3; stopping the other 1 worker(s)" in text
    assert "[launch] failed: exit status 3" in text


def test_worker_ignoring_sigterm_is_killed_after_grace(tmp_path):
    body = """
    import os, signal, sys, time
    if os.environ["TRAINER_RANK"] == "1":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(120)
    """
    out = io.StringIO()
    start = time.monotonic()
    status = launch.launch([script(tmp_path, body)], num_workers=2, grace_s=1, out=out)
    elapsed = time.monotonic() - start
    assert status == 128 + 9  # The first failure's status: worker 1 killed by SIGKILL.
    assert elapsed < 15, elapsed
    assert "worker 1 was killed by SIGKILL" in out.getvalue()


def test_all_workers_succeed_but_one_late_failure_counts(tmp_path):
    body = """
    import os, sys, time
    time.sleep(0.3 * int(os.environ["TRAINER_RANK"]))
    sys.exit(0 if os.environ["TRAINER_RANK"] == "0" else 5)
    """
    assert launch.launch([script(tmp_path, body)], num_workers=2, out=io.StringIO()) == 5


@pytest.mark.parametrize("args, message", [
    (["--num_workers=0", "--", "run.py"], "--num_workers must be a positive integer"),
    (["--num_workers=2"], "give the command after --"),
    (["--num_workers=2", "--base_port=65535", "--", "run.py"], "--base_port=65535"),
])
def test_cli_bad_arguments(args, message):
    result = subprocess.run([sys.executable, "-m", "trainer.launch", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_exit_status_is_the_workers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--",
         script(tmp_path, "import sys; print('hi'); sys.exit(7)")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 7
    # The first worker to exit stops the other, which may not have printed yet; whatever
    # each printed carries its prefix.
    hi_lines = [line for line in result.stdout.splitlines() if line.endswith("hi")]
    assert hi_lines and all(line in ("[w0] hi", "[w1] hi") for line in hi_lines)


def test_worker_env_is_tf_config_json():
    env = launch.worker_env(1, ["localhost:1", "localhost:2"], base={"PATH": "/bin"})
    assert json.loads(env["TF_CONFIG"]) == {
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}
    assert env["PATH"] == "/bin" and env["TRAINER_LOCAL_SIZE"] == "2"
