"""Input shard → stream of decoded samples: the first stage of every job.

A shard is read member by member in tar stream mode over an fsspec file object, so memory holds one
sample at a time whatever the shard's size, and local, `memory://` and `s3://` shards take the same
path; shards compressed with gzip, bzip2 or xz (`.tar.gz`, `.tgz`, ...) are decompressed as they
stream, as WebDataset reads them, and a file that is no tar at all is named (ZIP, Zstandard, an
image...). Members are grouped into samples as WebDataset does (`pipeline.io.names`: key up to the
first dot of the basename, lower-case extension), a sample is a run of adjacent members with the
same key, and hidden and WebDataset metadata members are skipped and counted in `ReadStats.skipped`.

Bad input never stops a shard: each bad sample becomes exactly one `SampleError` and reading goes
on. A shard that cannot be opened or is not a tar gives one `SampleError` with key `""`; a shard cut
off mid-way gives its good samples and then one `SampleError` for the sample it was reading (or key
`""` when it broke between samples). Reasons name the member and the problem, never the storage
options.

A corrupt header mid-shard is never taken for the end. Python's `tarfile` ends an archive quietly at
the first header it cannot parse, so a shard with one damaged header in the middle (bit rot, a bad
copy) would look whole. It is reported as a cut shard is: the sample read before it fails (the lost
member may have been its), the shard does not reach its end (`ReadStats.end_of_archive` False,
`ReadStats.corrupt_header_at` its offset), and nothing after it is read. Reading on from the next
valid header (GNU `tar --ignore-zeros`) cannot tell a lost member's data, or a tar stored inside a
member, from members; a user can repair the shard that way, checking what it gives, and relabel.
Tars joined with `cat` are read up to the first end-of-archive marker, as GNU tar reads them without
`-i`; data after it is named in `ReadStats.data_after_end` and a warning, never dropped in silence
(gzip shards joined the same way are read up to their first stream's end without this check).

A failing store is not bad input. When a read raises (S3 answering 500, a reset connection) the
file is reopened and the read resumes at the same byte offset, with backoff, for up to `retry_s`
seconds; the tar parser never sees the failure. After that `ShardReadError` is raised: the shard
must be retried, never committed with the samples read so far (that would be silent data loss).
Only bytes that really end early or are corrupt give the "truncated" `SampleError` above.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from pipeline import schema
from pipeline.io import fs, names
from pipeline.io.decode import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

# A member larger than this is refused unread (a sample is held in memory while it is decoded).
MAX_MEMBER_BYTES = 1 << 30
# Seconds a failing read is retried (resuming at its offset) before the shard attempt fails; the
# backoff between tries doubles from the first delay up to the last.
READ_RETRY_S = 60.0
_BACKOFF_S = (0.5, 8.0)


class ShardReadError(RuntimeError):
    """The shard's bytes could not be read (the store kept failing): retry the shard, never commit it."""


@dataclass
class ReadStats:
    """What the reader saw of one shard, for its commit marker: tar `members` (every entry, directories
    included), whether the end-of-archive marker was reached (`end_of_archive`, False for a cut or
    corrupt shard), `bytes` read, `resumed_reads`, reads that failed and were resumed, and
    `corrupt_header_at`, the tar offset (after decompression) of a corrupt header that ended reading,
    and `data_after_end`, whether bytes other than zero padding follow the end-of-archive marker."""

    members: int = 0
    end_of_archive: bool = False
    skipped: dict[str, int] = field(default_factory=dict)  # members that are not samples, by kind (names.py)
    bytes: int = 0
    resumed_reads: int = 0
    corrupt_header_at: int | None = None
    data_after_end: bool = False


@dataclass(frozen=True, eq=False)
class Sample:
    """One decoded input sample.

    `shard` is the shard URL as passed to `iter_samples`; `image` is (H, W, 3) uint8 RGB, 0..255;
    `json` is the parsed `json` member (an object) and `txt` the UTF-8 `txt` member, when present;
    `extra` maps every other member's extension (e.g. `"seg.png"`, or a second image) to its bytes.
    Samples compare by identity (`eq=False`): an array has no single truth value to compare with.
    """

    shard: str
    key: str
    image: np.ndarray
    json: dict[str, Any] | None = None
    txt: str | None = None
    extra: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleError:
    """A sample (or, with `key == ""`, a whole shard or its unreadable tail) that could not be read."""

    shard: str
    key: str
    reason: str


@dataclass
class _Group:
    """Members of one key gathered so far, and the problems found with them."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_samples(
    url: str,
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retry_s: float = READ_RETRY_S,
    stats: ReadStats | None = None,
) -> Iterator[Sample | SampleError]:
    """Stream the samples of the tar shard at `url`, in tar order, as `Sample` or `SampleError`.

    Nothing is extracted to disk; member names only become keys, so a name such as
    `../../etc/x.jpg` is reported as unsafe and never used as a path. `max_pixels` bounds the
    pixel count read from an image header before decoding. A read that keeps failing for
    `retry_s` seconds raises `ShardReadError`. `stats`, when given, is filled in as reading goes.

    Raises:
        ShardReadError: the store failed for longer than `retry_s` (the samples yielded so far are
            not the whole shard).
    """
    stats = stats if stats is not None else ReadStats()
    try:
        filesystem, path = fs.url_to_fs(url, storage_options)
        raw = filesystem.open(path, "rb")
    except FileNotFoundError:
        yield _shard_error(url, "cannot open shard: no such file")
        return
    except Exception as exc:  # permissions, network, bad URL: the shard is unreadable, the run goes on
        yield _shard_error(url, f"cannot open shard: {type(exc).__name__}: {exc}")
        return
    reader = _ResumingReader(url, raw, lambda: filesystem.open(path, "rb"), retry_s, stats)
    try:
        yield from _iter_tar(url, reader, max_pixels, stats)
    finally:
        reader.close()


def _iter_tar(url: str, raw: _ResumingReader, max_pixels: int, stats: ReadStats) -> Iterator[Sample | SampleError]:
    head = _HeadRecorder(raw)
    damage = _DamageLog()
    try:
        # "*": gzip, bzip2 and xz are decompressed as they stream
        tar = tarfile.open(fileobj=head, mode="r|*", tarinfo=damage.tarinfo_class())
    except tarfile.ReadError as exc:
        what = names.describe_non_tar(head.head)
        yield _shard_error(url, f"not a tar archive{': ' + what if what else ''} ({exc})")
        return
    except OSError as exc:  # the store failed on the first read
        yield _shard_error(url, f"cannot read shard: {type(exc).__name__}: {exc}")
        return
    group: _Group | None = None
    seen: set[str] = set()
    try:
        for member in tar:
            stats.members += 1
            if member.isdir():
                continue  # directory entries carry no sample data
            skip = names.skip_reason(member.name)
            if skip is not None:
                stats.skipped[skip] = stats.skipped.get(skip, 0) + 1
                continue
            key, ext = names.split_name(member.name)
            if group is None or key != group.key:
                if group is not None:
                    yield _finish(url, group, max_pixels)
                group = _Group(key)
                if key in seen:
                    group.problems.append("members of this key are not adjacent in the tar (key seen before)")
                seen.add(key)
            _add_member(tar, member, ext, group)
        if damage.offset is not None:  # tarfile stopped at it as if at the end
            stats.corrupt_header_at = damage.offset
            raise tarfile.ReadError(f"a corrupt tar header follows ({damage.problem}); nothing after it is read")
        if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:  # pos: tar bytes, after decompression
            # tarfile ends quietly when a shard is cut exactly between members; only a missing
            # end-of-archive block tells us, and the last sample may then lack members.
            raise tarfile.ReadError("no end-of-archive marker")
        stats.end_of_archive = True
        stats.data_after_end = _data_after_end(tar.fileobj)
        if stats.data_after_end:
            logger.warning("shard %s: data follows its end-of-archive marker (tars joined with cat?); not read", url)
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a compressed stream cut short
        key = group.key if group is not None else ""
        where = "while reading this sample" if group is not None else "before its first sample"
        logger.warning("shard %s is truncated or corrupt near sample %r: %s", url, key, exc)
        yield SampleError(url, key, f"shard truncated or corrupt {where} ({exc})")
        return
    if group is not None:
        yield _finish(url, group, max_pixels)


def _data_after_end(stream: Any) -> bool:
    """Whether the tar stream holds more than zero padding after its end-of-archive marker, such as a
    second tar joined with `cat`, which `tarfile` (like GNU tar without -i) stops before. Reads until
    the first such byte: a whole shard's padding is a few blocks."""
    while chunk := stream.read(1 << 16):
        if chunk.strip(b"\0"):
            return True
    return False


class _DamageLog:
    """Keeps the header that made `tarfile` stop, through a `TarInfo` subclass (tarfile's own hook):
    `tarfile` treats a header it cannot parse after the first member as the end of the archive."""

    def __init__(self) -> None:
        self.offset: int | None = None  # tar offset of the corrupt header, when one ended reading
        self.problem = ""  # tarfile's reason, e.g. "bad checksum"

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        log = self

        class _CheckedTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
                offset = tar.fileobj.tell()
                try:
                    return super().fromtarfile(tar)
                except tarfile.InvalidHeaderError as exc:
                    log.offset, log.problem = offset, str(exc)
                    raise

        return _CheckedTarInfo


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: _Group) -> None:
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts:
        group.problems.append(f"unsafe member path {name!r} (absolute or leaving the archive)")
    elif not member.isfile():
        group.problems.append(f"member {name!r} is a link or special file, not a regular file")
    elif not ext or not posixpath.basename(group.key):
        group.problems.append(f"member name {name!r} has no key.extension form")
    elif ext in group.members:
        group.problems.append(f"duplicate member {name!r}")
    elif member.size > MAX_MEMBER_BYTES:
        group.problems.append(f"member {name!r} is {member.size} bytes, above {MAX_MEMBER_BYTES}")
    else:
        group.members[ext] = tar.extractfile(member).read()


def _finish(url: str, group: _Group, max_pixels: int) -> Sample | SampleError:
    """Turn a complete group into a Sample, or into one SampleError naming everything wrong with it."""
    problems = list(group.problems)
    members = dict(group.members)
    image_ext = next((ext for ext in schema.IMAGE_EXTS if ext in members), None)
    if image_ext is None and not problems:
        found = ", ".join(sorted(members)) or "none"
        # seg.png is the truth map, not a misnamed image; the first dotted extension in name order keeps
        # the reason the same for the same members
        dotted = names.dotted_extension(sorted(set(members) - {schema.TRUTH_EXT}), schema.IMAGE_EXTS)
        if dotted is not None:
            found += f" (the key ends at the first dot: a member named KEY.{dotted} belongs to key KEY)"
        problems.append(f"no image member (one of {', '.join(schema.IMAGE_EXTS)}); members: {found}")
    image = meta = text = None
    if schema.JSON_EXT in members:
        try:
            meta = json.loads(members.pop(schema.JSON_EXT))
            if not isinstance(meta, dict):
                problems.append(f"json: must be an object, got {type(meta).__name__}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"json: invalid JSON ({exc})")
    if schema.TEXT_EXT in members:
        try:
            text = members.pop(schema.TEXT_EXT).decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"txt: not UTF-8 ({exc})")
    if image_ext is not None and not problems:  # decode last: the costliest check
        try:
            image = decode_image(members.pop(image_ext), max_pixels, where=f"sample {group.key!r} of shard {url}")
        except ValueError as exc:
            problems.append(f"{image_ext}: {exc}")
    if problems:
        reason = "; ".join(problems)
        logger.debug("bad sample %s in %s: %s", group.key, url, reason)
        return SampleError(url, group.key, reason)
    return Sample(shard=url, key=group.key, image=image, json=meta, txt=text, extra=members)


def _shard_error(url: str, reason: str) -> SampleError:
    logger.warning("shard %s: %s", url, reason)
    return SampleError(url, "", reason)


class _HeadRecorder:
    """Passes reads through and keeps the file's first bytes, to name a file that is not a tar."""

    def __init__(self, f: _ResumingReader) -> None:
        self._f = f
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if len(self.head) < names.MAGIC_BYTES:
            self.head += data[: names.MAGIC_BYTES - len(self.head)]
        return data


class _ResumingReader:
    """Read-only file wrapper that counts the bytes delivered (to tell a cut-off tar from a whole one)
    and, when a read raises, reopens the file and resumes at the same offset until `retry_s` is spent."""

    def __init__(
        self, url: str, f: IO[bytes], reopen: Callable[[], IO[bytes]], retry_s: float, stats: ReadStats
    ) -> None:
        self._url, self._f, self._reopen, self._retry_s, self._stats = url, f, reopen, retry_s, stats
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        deadline, delay = None, _BACKOFF_S[0]
        while True:
            try:
                if self._f is None:
                    self._f = self._reopen()
                    self._f.seek(self.bytes_read)
                data = self._f.read(size)
                break
            except Exception as exc:  # whatever the store raises (OSError, botocore, aiohttp): retry
                self.close()
                now = time.monotonic()
                deadline = deadline or now + self._retry_s
                problem = f"{type(exc).__name__}: {exc}"
                if now >= deadline:
                    raise ShardReadError(
                        f"reading {self._url} failed at byte {self.bytes_read} for {self._retry_s:g}s: {problem}"
                    ) from exc
                logger.warning("reading %s failed at byte %d (%s); resuming", self._url, self.bytes_read, problem)
                self._stats.resumed_reads += 1
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, _BACKOFF_S[1])
        self.bytes_read += len(data)
        self._stats.bytes = self.bytes_read
        return data

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except Exception as exc:  # a broken connection may fail to close too; it is dropped either way
                logger.debug("closing %s: %s", self._url, exc)
