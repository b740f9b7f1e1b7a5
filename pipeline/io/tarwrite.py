"""Streaming WebDataset tar writer for any fsspec URL, committed by rename when it closes.

Members are written as they come (never a whole shard in memory) to a temporary sibling name; only
a clean `close()` moves the file to its final name, so a killed writer leaves no half shard under a
name a reader trusts. Headers carry fixed metadata (mtime 0, uid 0, mode 0o644) so the same samples
give byte-identical shards on any machine.

The format is POSIX pax, so any key an input tar can hold can be written back byte for byte: names
longer than ustar's 100 + 155 bytes go into a pax header, and a key that is not valid UTF-8 (the
reader keeps such bytes as surrogate escapes, PEP 383) is written with `hdrcharset=BINARY`, its
original bytes. Plain ASCII names of ustar length get no pax header, the same bytes as ustar.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from types import TracebackType
from typing import Any

from pipeline.io import fs


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
        self._tar = tarfile.open(fileobj=self._hashed, mode="w|", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot in its basename (WebDataset keys)")
        if not key or key.startswith("/") or "\\" in key or ".." in key.split("/"):
            # A reader extracting this shard would write outside its folder.
            raise ValueError(f"sample key {key!r} must be a relative name without '..' components")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
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
        self._tar.close()
        self._file.close()
        fs.move(self._tmp, self.url, self.storage_options)

    def abort(self) -> None:
        """Drop the partial file; the final name is left untouched."""
        try:
            self._tar.close()
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
