"""Output paths are proven writable before training; a failed final write still shows the run.

The file systems here are real: /proc and /sys, /dev/null, and small tmpfs mounts (read-only,
or with no room left) made for the test when the machine lets us mount (root on Linux).
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from trainer.errors import UserError
from trainer.outputs import files

LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(options)`` mounts a fresh tmpfs under tmp_path and returns its path."""
    mounted = []

    def mount(options: str) -> str:
        point = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True, timeout=30)


def refusal(check, path, flag):
    """Runs ``check(path, flag)``, asserts a one-line UserError naming the flag, returns it."""
    with pytest.raises(UserError) as info:
        check(path, flag)
    message = str(info.value)
    assert "\n" not in message and flag in message, message
    return message


def test_new_nested_folder_is_created_and_left_empty(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    files.check_output_dir(str(target), "--model_dir")
    assert target.is_dir() and os.listdir(target) == []  # The probe file is gone.
    files.check_output_file(str(tmp_path / "m" / "metrics.json"), "--metrics_file")
    assert os.listdir(tmp_path / "m") == []


def test_existing_files_are_not_touched(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"old": 1}\n')
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep").write_text("x")
    files.check_output_file(str(metrics), "--metrics_file")
    files.check_output_dir(str(tmp_path / "ckpt"), "--model_dir")
    assert metrics.read_text() == '{"old": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "metrics.json"]
    assert os.listdir(tmp_path / "ckpt") == ["keep"]


def test_missing_parent_folders_of_an_output_file_are_created(tmp_path):
    files.check_output_file(str(tmp_path / "x" / "m.json"))
    assert (tmp_path / "x").is_dir()


def test_device_file_as_model_dir_refused():
    message = refusal(files.check_output_dir, "/dev/null", "--model_dir")
    assert "'/dev/null'" in message and "character device, not a folder" in message


@pytest.mark.parametrize("check, flag, tail", [
    (files.check_output_dir, "--model_dir", "x"),
    (files.check_output_file, "--metrics_file", "x.json"),
])
def test_path_under_a_file_refused(tmp_path, check, flag, tail):
    blocker = tmp_path / "hostname"
    blocker.write_text("host\n")
    message = refusal(check, str(blocker / tail), flag)
    assert f"{str(blocker)!r} is a file, not a folder" in message
    assert blocker.read_text() == "host\n" and os.listdir(tmp_path) == ["hostname"]


@pytest.mark.skipif(not LINUX, reason="/proc and /sys are Linux's")
@pytest.mark.parametrize("check, path, flag, fs", [
    (files.check_output_file, "/proc/x.json", "--metrics_file", "proc"),
    (files.check_output_file, "/sys/x.json", "--metrics_file", "sysfs"),
    (files.check_output_dir, "/proc/run", "--model_dir", "proc"),
    (files.check_output_dir, "/sys/run", "--model_dir", "sysfs"),
])
def test_virtual_file_systems_refused(check, path, flag, fs):
    # os.access(W_OK) says yes here, for root at least: the probe file says no.
    message = refusal(check, path, flag)
    assert f"a {fs} file system" in message and "writable disk" in message
    assert not os.path.lexists(path)


def test_non_regular_metrics_file_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    message = refusal(files.check_output_file, str(fifo), "--metrics_file")
    assert "named pipe, not a regular file" in message
    message = refusal(files.check_output_file, "/dev/null", "--metrics_file")
    assert "character device" in message  # write_json would replace /dev/null itself.


@pytest.mark.parametrize("path", ["{tmp}/", "{tmp}", "", "a\0b"])
def test_folder_or_unusable_metrics_path_refused(tmp_path, path):
    refusal(files.check_output_file, path.format(tmp=tmp_path), "--metrics_file")


def test_read_only_file_system_refused(tmpfs):
    root = tmpfs("ro,size=64k")
    for check, path, flag in [(files.check_output_dir, f"{root}/run", "--model_dir"),
                              (files.check_output_dir, root, "--model_dir"),
                              (files.check_output_file, f"{root}/m.json", "--metrics_file")]:
        assert "Read-only file system" in refusal(check, path, flag)
    assert os.listdir(root) == []


def test_full_file_system_refused_and_new_folders_removed(tmpfs):
    # Room for the root and the folders a/b/c, none for the probe file: a real full disk.
    root = tmpfs("size=64k,nr_inodes=4")
    message = refusal(files.check_output_dir, f"{root}/a/b/c", "--model_dir")
    assert "No space left on device" in message
    assert os.listdir(root) == []  # The folders the check made are gone again.


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_folder_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "Permission denied" in refusal(
            files.check_output_file, str(folder / "m.json"), "--metrics_file")
    finally:
        folder.chmod(0o755)


def test_write_json_follows_symlink_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    files.write_json(str(link), {"a": 1.5})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1.5}
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


SUMMARY = {"test_accuracy": 0.8125, "global_step": 12, "history": [{"epoch": 1, "loss": 0.5}]}


def test_write_metrics_writes_the_summary(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    files.write_metrics(str(path), SUMMARY)
    assert json.loads(path.read_text()) == SUMMARY
    assert capsys.readouterr().out == ""


def test_write_metrics_prints_the_summary_when_the_folder_became_a_file(tmp_path, capsys):
    # Checked fine before training; then the folder was replaced by a file (root ignores
    # permission bits, so this is how the folder stops being writable here).
    folder = tmp_path / "out"
    path = folder / "metrics.json"
    files.check_output_file(str(path), "--metrics_file")
    folder.rmdir()
    folder.write_text("in the way\n")
    with pytest.raises(UserError) as info:
        files.write_metrics(str(path), SUMMARY)
    message = str(info.value)
    assert message.startswith(f"could not write --metrics_file {path} (")
    assert message.endswith("; the summary is printed above") and "\n" not in message
    assert json.loads(capsys.readouterr().out) == SUMMARY
    assert folder.read_text() == "in the way\n"


def test_write_metrics_on_a_full_disk_keeps_the_old_file(tmpfs, capsys):
    root = tmpfs("size=4k")  # One page: the summary below does not fit.
    path = os.path.join(root, "metrics.json")
    with open(path, "w") as f:
        f.write('{"old": 1}\n')
    big = dict(SUMMARY, history=[{"epoch": i, "loss": 0.5} for i in range(400)])
    with pytest.raises(UserError, match="No space left on device"):
        files.write_metrics(path, big)
    assert json.loads(capsys.readouterr().out) == big
    with open(path) as f:
        assert f.read() == '{"old": 1}\n'  # Atomic: the old file is whole,
    assert os.listdir(root) == ["metrics.json"]  # and no temp file is left.


def test_unusable_path_creates_nothing(tmp_path):
    refusal(files.check_output_dir, str(tmp_path / "x" / "a\0b"), "--model_dir")
    assert os.listdir(tmp_path) == []


def test_metrics_file_naming_the_model_dir_refused_before_training(tmp_path):
    # Checked in the other order, both pass, and the write fails only after training.
    same = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--metrics_file .* is a folder; pass a file path"):
        files.check_outputs(metrics_file=same, model_dir=same)


@pytest.mark.parametrize("inside", ["run.json", "checkpoints/m.json", "./best", "profile/m.json",
                                    "comparison.json"])
def test_metrics_file_over_a_model_dir_entry_refused(tmp_path, inside):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "run.json").write_text('{"policy": "float32"}\n')
    with pytest.raises(UserError) as info:
        files.check_outputs(metrics_file=str(model_dir / inside), model_dir=str(model_dir))
    assert "which the run keeps in --model_dir" in str(info.value)
    assert (model_dir / "run.json").read_text() == '{"policy": "float32"}\n'
    assert os.listdir(model_dir) == ["run.json"]  # Nothing made for the refused file.


def test_metrics_file_beside_the_run_in_model_dir_accepted(tmp_path):
    model_dir = tmp_path / "new" / "run"
    files.check_outputs(metrics_file=str(model_dir / "metrics.json"), model_dir=str(model_dir))
    assert model_dir.is_dir() and os.listdir(model_dir) == []
    files.check_outputs(metrics_file=None, model_dir=None)  # Neither flag: nothing to do.
