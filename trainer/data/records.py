"""TFRecord files: the index of a set of shards (records per file, found from headers only),
the checks that catch a bad file before training, and the writer of image shards.

A TFRecord file is a sequence of records, each ``uint64 length | uint32 masked CRC-32C of
the length | data | uint32 masked CRC-32C of the data`` (little-endian). Counting records
needs only the 12-byte headers: :func:`scan` reads those with ``pread`` and seeks over the
data, so indexing a 2 GB set reads a few hundred kilobytes, and a resumed run reads nothing it
has trained on already. The first header's CRC tells a file that is not TFRecord at all; a
length that runs past the end of the file tells a truncated last record.

No TensorFlow in the scan: the pipelines (``trainer/data/sharded.py``) read the records.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
from typing import List, Sequence, Tuple

from trainer.errors import UserError

_HEADER = 12  # uint64 length + uint32 masked CRC of the length.
_FOOTER = 4  # uint32 masked CRC of the data.


def _crc32c_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses (only ever run on 8-byte headers)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Shard:
    """One TFRecord file: its path, size in bytes and record count."""

    path: str
    size: int
    records: int


def scan(path: str) -> Shard:
    """Counts the records of one TFRecord file from its headers; checks its framing.

    Raises:
      UserError: naming the file (and the record) when it cannot be read, is not TFRecord
        (its first header's checksum is wrong) or ends inside a record (truncated).
    """
    fix = "write it again (python -m trainer.data.write_shards) or leave it out of the glob"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        offset, records = 0, 0
        while offset < size:
            header = os.pread(fd, _HEADER, offset)
            if len(header) < _HEADER:
                raise UserError(f"{path}: record {records} is truncated (the file ends inside "
                                f"its header at byte {size}); {fix}")
            length, crc = struct.unpack("<QI", header)
            if records == 0 and masked_crc(header[:8]) != crc:
                raise UserError(f"{path} is not a TFRecord file (its first record's header "
                                f"checksum is wrong); {fix}")
            end = offset + _HEADER + length + _FOOTER
            if end > size:
                raise UserError(f"{path}: record {records} is truncated (it needs {end} bytes, "
                                f"the file has {size}); {fix}")
            offset, records = end, records + 1
    finally:
        os.close(fd)
    return Shard(path, size, records)


def expand(pattern: str, *, flag: str = "--dataset") -> List[str]:
    """The files a glob names, sorted (the order is part of the data order).

    Raises:
      UserError: when the glob names no file.
    """
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise UserError(f"{flag}: no file matches {pattern!r}; check the path (quote the glob so "
                        "the shell does not expand it), or write shards with python -m "
                        "trainer.data.write_shards")
    return files


def index(files: Sequence[str]) -> Tuple[Shard, ...]:
    """:func:`scan` of every file: a bad file stops the run before step 1."""
    shards = tuple(scan(f) for f in files)
    empty = [s.path for s in shards if not s.records]
    if len(empty) == len(shards):
        raise UserError(f"{shards[0].path} and the other files of the set hold no records; "
                        "write the shards again")
    return shards


def glob_has_files(pattern: str) -> bool:
    return any(os.path.isfile(f) for f in glob.glob(os.path.expanduser(pattern)))
