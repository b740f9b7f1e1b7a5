"""Streaming WebDataset tar writer for any fsspec URL, committed by rename when it closes.

Members are written as they come (never a whole shard in memory) to a temporary sibling name; only
a clean `close()` moves the file to its final name, so a killed writer leaves no half shard under a
name a reader trusts. Headers carry fixed metadata (mtime 0, uid 0, mode 0o644) so the same samples
give byte-identical shards on any machine.

The format is POSIX pax, so any key an input tar can hold can be written back byte for byte: names
longer than ustar's 100 + 155 bytes go into a pax header, and a key that is not valid UTF-8 (the
reader keeps such bytes as surrogate escapes, PEP 383) is written with `hdrcharset=BINARY`, its
original bytes. Plain ASCII names of ustar length get no pax header, the same bytes as ustar.

The archive bytes are those of `tarfile`'s stream writer (`mode="w|"`, pax format), but written
here: headers of plain names are packed directly, since `tarfile` spends more on one header than
a 96 px label map costs to encode (other names go through `TarInfo.tobuf`, its own pax headers).
"""

from __future__ import annotations

import hashlib
import tarfile
from types import TracebackType
from typing import Any

from pipeline.io import fs

# Every member's fixed metadata (FORMAT: byte-identical shards on any machine).
_MODE, _MTIME = 0o644, 0
_USTAR_NAME_MAX = 100  # a longer or non-ASCII name needs a pax header
_USTAR_SIZE_MAX = 8**11 - 1  # the largest size 11 octal digits hold
_NUL = b"\0"


class TarShardWriter:
    """Write samples `{ext: bytes}` under `key` into the tar at `url`; commit on close."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self._tmp = fs.temp_name(url)
        filesystem, path = fs.url_to_fs(self._tmp, storage_options)
        filesystem.makedirs(filesystem._parent(path), exist_ok=True)
        self._file = filesystem.open(path, "wb")
        self._hashed = _HashingWriter(self._file)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot in its basename (WebDataset keys)")
        if not key or key.startswith("/") or "\\" in key or ".." in key.split("/"):
            # A reader extracting this shard would write outside its folder.
            raise ValueError(f"sample key {key!r} must be a relative name without '..' components")
        for ext, data in members.items():
            self._hashed.write(_header(f"{key}.{ext}", len(data)))
            self._hashed.write(data)
            self._hashed.write(_NUL * (-len(data) % tarfile.BLOCKSIZE))
        self.count += 1

    @property
    def size(self) -> int:
        """Bytes written so far (the whole file once closed)."""
        return self._hashed.size

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far (of the whole file once closed): taken as the bytes
        stream out, so a commit marker never has to read a shard back from object storage."""
        return self._hashed.digest.hexdigest()

    def close(self) -> None:
        """Finish the tar and move it to its final name."""
        self._finish()
        self._file.close()
        fs.move(self._tmp, self.url, self.storage_options)

    def _finish(self) -> None:
        """The end-of-archive marker (two zero blocks), then zeros to a whole record, as `tarfile` ends."""
        self._hashed.write(_NUL * (2 * tarfile.BLOCKSIZE))
        self._hashed.write(_NUL * (-self._hashed.size % tarfile.RECORDSIZE))

    def abort(self) -> None:
        """Drop the partial file; the final name is left untouched."""
        try:
            self._file.close()
        finally:
            fs.remove(self._tmp, self.storage_options)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _header(name: str, size: int) -> bytes:
    """The header block(s) `tarfile` writes for a regular file `name` of `size` bytes in pax format."""
    if not name.isascii() or len(name) > _USTAR_NAME_MAX or size > _USTAR_SIZE_MAX:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _MTIME, _MODE
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    block = bytearray(tarfile.BLOCKSIZE)
    fields = (b"%07o\0" % _MODE, b"0000000\0" * 2, b"%011o\0" % size, b"%011o\0" % _MTIME, b" " * 8, tarfile.REGTYPE)
    block[: len(name)] = name.encode("ascii")
    block[100:157] = b"".join(fields)  # mode, uid, gid, size, mtime, checksum (spaces while summed), type
    block[257:265] = tarfile.POSIX_MAGIC  # user and group names, device numbers and prefix stay NUL
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


class _HashingWriter:
    """A write-only file wrapper that counts and hashes every byte on its way to `file`."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._file.write(data)
