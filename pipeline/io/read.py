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

Nothing after a damaged header is dropped in silence. Python's `tarfile` ends an archive quietly at
the first header it cannot parse, so a shard whose middle header is corrupt (bit rot, a bad copy)
would look whole and lose every sample after it. It is read as GNU `tar --ignore-zeros` reads it
(`tarfile`'s `ignore_zeros`): unparseable blocks are skipped up to the next valid header, the member
whose header was lost is reported (its sample fails when the damaged header still holds a readable
name, else the samples on both sides of it fail, as either may have lost it), and reading goes on;
`ReadStats.corrupt_bytes` counts what was skipped. The same rule reads tars joined with `cat` whole, members after each end-of-archive
marker included.

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
    `corrupt_bytes`, tar bytes (after decompression) skipped over damaged headers."""

    members: int = 0
    end_of_archive: bool = False
    skipped: dict[str, int] = field(default_factory=dict)  # members that are not samples, by kind (names.py)
    bytes: int = 0
    resumed_reads: int = 0
    corrupt_bytes: int = 0


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
    blocks = _BlockLog()
    try:
        # "*": gzip, bzip2 and xz are decompressed as they stream; ignore_zeros: see the module docstring
        tar = tarfile.open(fileobj=head, mode="r|*", tarinfo=blocks.tarinfo_class(), ignore_zeros=True)
    except tarfile.ReadError as exc:
        what = names.describe_non_tar(head.head)
        yield _shard_error(url, f"not a tar archive{': ' + what if what else ''} ({exc})")
        return
    except OSError as exc:  # the store failed on the first read
        yield _shard_error(url, f"cannot read shard: {type(exc).__name__}: {exc}")
        return
    group: _Group | None = None
    seen: set[str] = set()
    unnamed_loss: list[str] = []  # problems for the next sample: a member of no readable name was lost before it

    def start_group(key: str) -> Iterator[SampleError | Sample]:
        nonlocal group
        if group is not None and key == group.key:
            return
        if group is not None:
            yield _finish(url, group, max_pixels)
        group = _Group(key, problems=unnamed_loss[:])
        unnamed_loss.clear()
        if key in seen:
            group.problems.append("members of this key are not adjacent in the tar (key seen before)")
        seen.add(key)

    def damage() -> Iterator[SampleError | Sample]:
        """The damaged stretches read since the last member: each fails the sample it belonged to; one
        whose name is unreadable fails the samples on both sides of it, either of which it may have
        belonged to (a sample missing a member must never pass as whole)."""
        for stretch in blocks.take_damage():
            stats.corrupt_bytes += stretch.size
            logger.warning(
                "shard %s: %s (%d bytes skipped from byte %d)", url, stretch.reason(), stretch.size, stretch.offset
            )
            if stretch.key is not None:
                yield from start_group(stretch.key)
                group.problems.append(stretch.reason())
                continue
            if group is not None:
                group.problems.append(stretch.reason("after"))
            unnamed_loss.append(stretch.reason("before"))

    try:
        for member in tar:
            yield from damage()
            stats.members += 1
            if member.isdir():
                continue  # directory entries carry no sample data
            skip = names.skip_reason(member.name)
            if skip is not None:
                stats.skipped[skip] = stats.skipped.get(skip, 0) + 1
                continue
            key, ext = names.split_name(member.name)
            yield from start_group(key)
            _add_member(tar, member, ext, group)
        yield from damage()
        if not blocks.ended:
            # Without a zero block after the last member the shard was cut (or ends in damage), and
            # the last sample may lack members.
            raise tarfile.ReadError("no end-of-archive marker")
        stats.end_of_archive = True
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a compressed stream cut short
        key = group.key if group is not None else ""
        where = "while reading this sample" if group is not None else "before its first sample"
        logger.warning("shard %s is truncated or corrupt near sample %r: %s", url, key, exc)
        problems = "".join(f"; {problem}" for problem in (group.problems if group is not None else ()))
        yield SampleError(url, key, f"shard truncated or corrupt {where} ({exc}){problems}")
        return
    if group is not None:
        yield _finish(url, group, max_pixels)
    elif unnamed_loss:  # damage after no sample at all
        yield SampleError(url, "", unnamed_loss[0])


@dataclass
class _Stretch:
    """Consecutive tar blocks that are no valid header, from `offset` (tar bytes, after decompression)."""

    offset: int
    size: int
    problem: str  # tarfile's reason for the first block
    name: str | None  # the member name the first block still holds, when it reads as one
    key: str | None = field(init=False)

    def __post_init__(self) -> None:
        parts = names.split_name(self.name) if self.name else None
        self.key = parts[0] if parts and parts[1] and posixpath.basename(parts[0]) else None

    def reason(self, where: str = "") -> str:
        """A failed row's reason: the same for the same fault (no offsets), so that summaries group it.
        `where` ("after" or "before") places a header of unreadable name next to the row's sample."""
        if self.key is not None:
            return f"corrupt tar header ({self.problem}): member {self.name!r}, which it names, is lost"
        near = {"after": "after this sample's members", "before": "just before this sample's members"}.get(where, "")
        return f"corrupt tar header{' ' + near if near else ''} ({self.problem}): a member of unreadable name is lost"


class _BlockLog:
    """Watches tarfile read headers (through a `TarInfo` subclass, tarfile's own hook) to keep what
    `ignore_zeros` skips: stretches of blocks that are no header, and whether zero blocks (the
    end-of-archive marker) follow the last member."""

    def __init__(self) -> None:
        self._damage: list[_Stretch] = []
        self._next = 0  # the offset after the last block that was no header, while in damage
        self._in_damage = False
        self.ended = False

    def take_damage(self) -> list[_Stretch]:
        damage, self._damage = self._damage, []
        return damage

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        log = self

        class _LoggedTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
                offset = tar.fileobj.tell()
                try:
                    info = super().fromtarfile(tar)
                except tarfile.EOFHeaderError:
                    log.ended, log._next = True, offset + tarfile.BLOCKSIZE
                    raise
                except tarfile.InvalidHeaderError as exc:
                    if offset == 0:  # no tar at all, not a damaged one
                        raise tarfile.ReadError(str(exc)) from None
                    log.invalid(offset, exc)
                    raise
                log.ended = log._in_damage = False
                return info

            @classmethod
            def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
                try:
                    return super().frombuf(buf, encoding, errors)
                except tarfile.InvalidHeaderError as exc:
                    exc.block = buf  # for the member name, when the damage spared it
                    raise

        return _LoggedTarInfo

    def invalid(self, offset: int, exc: tarfile.InvalidHeaderError) -> None:
        self.ended = False
        if self._in_damage and offset == self._next:
            # the lost member's data blocks (zero blocks among them included), or more damage
            self._damage[-1].size = offset + tarfile.BLOCKSIZE - self._damage[-1].offset
        else:
            name = _block_name(getattr(exc, "block", b""))
            self._damage.append(_Stretch(offset, tarfile.BLOCKSIZE, str(exc), name))
        self._in_damage, self._next = True, offset + tarfile.BLOCKSIZE


def _block_name(block: bytes) -> str | None:
    """The member name a damaged ustar header block still holds (prefix/name), or None when it has none
    or holds non-printable bytes (the damage hit the name, or the block is data)."""

    def field_text(raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    name = field_text(block[:100])
    if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
        name = f"{field_text(block[345:500])}/{name}"
    return name if name and name.isprintable() else None


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
