"""Files a run writes outside TensorFlow: output paths checked before training, atomic writes,
the metrics file.

What goes where inside ``--model_dir`` is :mod:`trainer.outputs.layout`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from typing import IO, Iterator, List, Optional

from trainer.errors import UserError
from trainer.outputs.layout import ENTRIES


def check_output_file(path: str, flag: str = "--metrics_file") -> None:
    """Proves now, before training, that an output file can be written at ``path``.

    Creates its missing parent folders (and removes them again on a refusal), then creates,
    writes, renames and deletes a probe file there, the same calls ``write_json`` makes:
    ``os.access`` says yes on /proc and /sys, and always for root. An existing regular file
    is left alone (the run replaces it at the end); anything else there is refused.

    Args:
      path: the output file, e.g. the value of ``--metrics_file``.
      flag: the flag named in the error, e.g. ``'--metrics_file'``.

    Raises:
      UserError: one line naming ``flag``, what is wrong and how to fix it.
    """
    flag = _flag(flag)
    _check_text(path, flag)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; pass a file path such as "
                        f"{os.path.join(path, 'metrics.json')!r}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} exists and is {_kind(path)}, not a regular file; "
                        "pass a new file path, or an existing JSON file to replace")
    real = os.path.realpath(path)  # write_json writes through a symlink, not over it.
    try:
        os.lstat(real)  # A name too long fails here rather than after training.
    except (FileNotFoundError, NotADirectoryError):
        pass  # A new file; a file on the way is named by the folder check below.
    except OSError as error:
        raise UserError(f"cannot use {path!r} for {flag} ({_reason(error)}); pass another "
                        f"file path for {flag}") from None
    if os.path.islink(real):  # realpath stops at a loop of symlinks.
        raise UserError(f"{flag} {path!r} is a symlink that leads nowhere (a loop); pass "
                        "another file path")
    _check_folder(os.path.dirname(real), flag, path)


def check_output_dir(path: str, flag: str = "--model_dir") -> None:
    """Creates the folder ``path`` if needed and proves files can be written in it.

    Args:
      path: the output folder, e.g. the value of ``--model_dir``.
      flag: the flag named in the error.

    Raises:
      UserError: one line naming ``flag`` when ``path`` (or a folder on the way to it) is a
        file, or the folder cannot be created or written in.
    """
    flag = _flag(flag)
    _check_text(path, flag)
    _check_folder(os.path.realpath(path), flag, path)


def check_outputs(*, metrics_file: Optional[str], model_dir: Optional[str]) -> None:
    """Checks ``--model_dir`` and ``--metrics_file`` together, before training.

    The folder is checked first, so a metrics file that names it is refused now rather than
    failing to replace a folder after training; and a metrics file may not replace one of
    the folder's own entries (its run file, say), which would lose them.

    Args:
      metrics_file: the ``--metrics_file`` value, or None / '' for none.
      model_dir: the ``--model_dir`` value, or None / '' for none.

    Raises:
      UserError: one line naming the flag to change.
    """
    if model_dir:
        check_output_dir(model_dir, "--model_dir")
    if not metrics_file:
        return
    if model_dir and "\0" not in metrics_file:
        inside = os.path.relpath(os.path.realpath(metrics_file), os.path.realpath(model_dir))
        entry = inside.split(os.sep)[0]
        if entry in ENTRIES:
            raise UserError(
                f"--metrics_file {metrics_file!r} would overwrite {entry!r}, which the run keeps "
                f"in --model_dir; pass another --metrics_file such as "
                f"{os.path.join(model_dir, 'metrics.json')!r}")
    check_output_file(metrics_file, "--metrics_file")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Opens a temp file next to ``path``; renames it over ``path`` when the block succeeds.

    Readers never see half a file, a symlink at ``path`` is followed (its target is
    replaced), the file gets a normal file's mode (``0o666`` less the umask), and a failure
    leaves ``path`` unchanged and no temp file behind. The one way the run writes any file.

    Args:
      path: the file to write.
      mode: ``'w'`` (text) or ``'wb'`` (bytes).
      **open_kwargs: passed to ``os.fdopen`` (e.g. ``newline=''`` for CSV).

    Raises:
      OSError: the file could not be written; ``path`` is then unchanged.
    """
    real = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".tmp-",
                               suffix=os.path.splitext(real)[1])
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode.
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` as indented JSON with :func:`atomic_write`.

    Raises:
      OSError: the file could not be written; ``path`` is then unchanged.
    """
    with atomic_write(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")


def history_rows(history) -> List[dict]:
    """The training history (``loop.EpochLog`` entries) as flat JSON rows.

    One row per log: ``epoch``, ``step``, the training metrics by name, the validation
    metrics as ``val_<name>``, ``ms_per_step`` and ``input_wait`` (the share of step time
    spent waiting for input).
    """
    return [{"epoch": h.epoch, "step": h.global_step, **h.train,
             **{f"val_{k}": v for k, v in h.validation.items()}, "ms_per_step": h.ms_per_step,
             "input_wait": h.input_wait}
            for h in history]


def write_metrics(path: str, summary: dict, flag: str = "--metrics_file") -> None:
    """Writes the run's summary to ``path``; if that fails, prints it so the run is not lost.

    Raises:
      UserError: the file could not be written (the folder vanished, the disk filled up...);
        the summary JSON has been printed to stdout first.
    """
    try:
        write_json(path, summary)
    except OSError as error:
        print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
        raise UserError(f"could not write {_flag(flag)} {path} ({_reason(error)}); the summary "
                        "is printed above") from None


def _check_folder(folder: str, flag: str, path: str) -> None:
    """Creates ``folder`` (and parents) if missing and writes a probe file in it.

    ``path`` is what the user passed, for the message.
    """
    missing = []
    parent = folder
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):  # The folder itself, or a folder on the way, is a file.
        what = "it" if parent == os.path.realpath(path) else repr(parent)
        raise UserError(f"cannot use {path!r} for {flag}: {what} is {_kind(parent)}, not a "
                        f"folder; choose another {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
        _probe_write(folder)
    except OSError as error:
        for created in missing:  # Deepest first; rmdir never removes anything but empty folders.
            with contextlib.suppress(OSError):
                os.rmdir(created)
        raise UserError(f"cannot use {path!r} for {flag}: cannot write files in {folder!r}"
                        f" ({_on_fs(folder)}{_reason(error)}); choose another {flag} on a "
                        "writable disk") from None


def _probe_write(folder: str) -> None:
    """Creates, writes, renames and removes a file in ``folder``: what write_json does."""
    fd, first = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    second = first + ".renamed"
    try:
        with os.fdopen(fd, "w") as f:
            f.write("{}\n")
        os.replace(first, second)
        with open(second) as f:
            if f.read() != "{}\n":
                raise OSError(errno.EIO, "a file written there does not read back")
    finally:
        for leftover in (first, second):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _check_text(path: str, flag: str) -> None:
    if not path or "\0" in path:  # os calls raise ValueError on a NUL byte.
        raise UserError(f"{flag} {path!r} is not a usable path; pass a file system path")


def _flag(flag: str) -> str:
    return flag if flag.startswith("--") else f"--{flag}"


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _kind(path: str) -> str:
    """'a file', 'a character device'... for an existing path that is not a folder."""
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if mode and test(mode):
            return name
    return "a broken symlink" if os.path.islink(path) else "not a folder"


def _on_fs(folder: str) -> str:
    """'a proc file system: ' when ``folder`` is on a virtual file system (Linux), else ''."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                if (folder == point or folder.startswith(point.rstrip("/") + "/")) \
                        and len(point) >= len(best):
                    best, kind = point, fields[2]
    except (OSError, IndexError):
        return ""
    return f"a {kind} file system: " if kind in _VIRTUAL_FILE_SYSTEMS else ""


# File systems whose files are views of the kernel: nothing a run writes can be kept there.
_VIRTUAL_FILE_SYSTEMS = ("proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs",
                         "securityfs", "configfs", "devpts", "bpf", "pstore", "efivarfs")
