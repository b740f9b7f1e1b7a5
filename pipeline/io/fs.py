"""Filesystem access for every stage: one fsspec path for local folders, `memory://`, `s3://` and `gs://`.

Credentials and endpoints come from the standard places of each filesystem (for S3 the `AWS_*`
variables, including `AWS_ENDPOINT_URL`, and profiles) or from `storage_options`. Nothing here
formats storage options into a message: errors name the URL only, so keys never reach a log.

Every answer to "does this exist" and "what is in this folder" is asked of the store, never of a
listing cache: s3fs and gcsfs keep listings per filesystem instance for the life of the process, so
a long-lived process (a notebook, a service, a second run) would otherwise see a removed commit
marker as present. `exists`, `listdir` and the reads drop the cached entries of their path first.

Writes follow the commit protocol of FORMAT.md: data goes to a temporary name, is moved to its final
name, and a commit marker is written last. On object stores a move is copy-then-delete and not
atomic, which is why readers trust only the marker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.spec import AbstractFileSystem

StorageOptions = dict[str, Any]
T = TypeVar("T")


def url_to_fs(url: str, storage_options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """Filesystem and protocol-less path for `url`; a bare path means the local filesystem."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a") and "endpoint_url" not in options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    if protocol in ("s3", "s3a") and "endpoint_url" in options:
        # s3fs takes the endpoint under client_kwargs; accept the flat spelling users write in YAML.
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", options.pop("endpoint_url"))
        options["client_kwargs"] = client_kwargs
    return fsspec.core.url_to_fs(url, **options)


def join(base: str, *parts: str) -> str:
    """Join URL path segments with `/` (never the OS separator: these are URLs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def fresh(url: str, storage_options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """`url_to_fs` with the filesystem's cached listings of the path (and its parents) dropped."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    return fs, path


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    """The whole file at `url`, one version of it. A file replaced between the open and the read (on
    S3 the read then fails with s3fs's FileExpired) is read again, so a reader racing a writer gets
    the newer version instead of an error. Raises FileNotFoundError naming `url`."""

    def read() -> bytes:
        fs, path = fresh(url, storage_options)  # a cached size from a listing would cut a rewritten file
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        return _retrying(read, _replaced_while_read)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


def read_text(url: str, storage_options: StorageOptions | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def read_json(url: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_text(url, storage_options))


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = fresh(url, storage_options)
    return fs.exists(path)


def listdir(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Names (basenames) of the entries of folder `url`, as the store lists them now; [] when it is missing."""
    fs, path = fresh(url, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))


TEMP_PREFIX = "_tmp."


def temp_name(url: str) -> str:
    """A sibling name no other writer uses, so concurrent or retried attempts never collide."""
    head, _, tail = url.rpartition("/")
    name = f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}.{tail}"
    return f"{head}/{name}" if head else name


def is_temp_name(url: str) -> bool:
    """True for names made by `temp_name`: files of an unfinished write, which no reader may list."""
    return url.rstrip("/").rpartition("/")[2].startswith(TEMP_PREFIX)


def move(src: str, dst: str, storage_options: StorageOptions | None = None) -> None:
    """Move src to dst, replacing dst: an atomic rename locally, copy-then-delete on object stores."""
    fs, src_path = url_to_fs(src, storage_options)
    _, dst_path = url_to_fs(dst, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
        os.replace(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path)


def put_atomic(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write `data` to `url` so that a reader sees either the old file or the whole new one."""
    tmp = temp_name(url)
    fs, tmp_path = url_to_fs(tmp, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(tmp_path) or ".", exist_ok=True)
    with fs.open(tmp_path, "wb") as f:
        f.write(data)
    move(tmp, url, storage_options)


def json_bytes(obj: Any) -> bytes:
    """`obj` as the JSON files of a run hold it (indented, keys sorted)."""
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def put_json(url: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    put_atomic(url, json_bytes(obj), storage_options)


_RETRIES = 5


def put_exclusive(url: str, data: bytes, storage_options: StorageOptions | None = None) -> bool:
    """Create `url` holding `data` only if no file has that name; True if this call created it.

    Of any number of writers racing for one name, exactly one wins, and a reader never sees a partial
    file. Locally: a hard link to a complete temporary file (fails when the name exists); on object
    stores: a conditional write (S3 `If-None-Match: *`) through fsspec's exclusive mode `xb`.
    """
    fs, path = url_to_fs(url, storage_options)
    if not is_local(fs):

        def create() -> bool:
            try:
                with fs.open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False

        return _retrying(create, _is_conflict)
    tmp = temp_name(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


def replace_if(url: str, data: bytes, expected: bytes | None, storage_options: StorageOptions | None = None) -> bool:
    """Write `data` to `url` only if it still holds `expected` (None: only if no file has that name);
    True if this call wrote it. A compare-and-swap: of writers racing from one `expected`, one wins.

    Locally: read, compare and write under an exclusive `flock` of `url + ".lock"` (the processes of
    one machine); on S3: a conditional write (`If-Match`) on the ETag read before the comparison, so
    a change in between fails it. Other stores compare, then write: there the swap is not atomic.
    """
    if expected is None:
        return put_exclusive(url, data, storage_options)
    fs, path = fresh(url, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not os.path.exists(path) or read_bytes(url) != expected:
                return False
            put_atomic(url, data)
            return True
    try:
        with fs.open(path, "rb") as f:  # the ETag of the object opened, and its bytes
            etag, current = getattr(f, "details", {}).get("ETag"), f.read()
    except FileNotFoundError:
        return False
    except OSError as exc:
        if not _replaced_while_read(exc):
            raise
        return False  # another writer won
    if current != expected:
        return False
    if "s3" not in _protocols(fs):
        put_atomic(url, data, storage_options)
        return True
    try:  # one PUT: readers see the old or the new object
        _retrying(lambda: fs.pipe_file(path, data, IfMatch=etag), _is_conflict)
    except OSError:
        fs.invalidate_cache(path)
        if fs.info(path).get("ETag") == etag:
            raise  # the object did not change: not a lost race but a failed write
        return False
    return True


def remove(url: str, storage_options: StorageOptions | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local filesystem, where paths are plain absolute paths and renames are atomic."""
    return _protocols(fs)[0] in ("file", "local")


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _retrying(call: Callable[[], T], transient: Callable[[OSError], bool]) -> T:
    """`call()`, retried with backoff while it fails with an error that `transient` accepts."""
    for attempt in range(_RETRIES - 1):
        try:
            return call()
        except OSError as exc:
            if not transient(exc):
                raise
            time.sleep(0.1 * 2**attempt)
    return call()  # the last attempt's error is the caller's


def _is_conflict(exc: OSError) -> bool:
    """EBUSY from s3fs: for a conditional write mostly S3's 409 ConditionalRequestConflict (another
    conditional write of the key is in flight; a retry then wins or sees its result), but also a store
    that stays busy (503, SlowDown) after s3fs's own retries; retried too, and raised if it lasts."""
    return exc.errno == errno.EBUSY


def _replaced_while_read(exc: OSError) -> bool:
    """s3fs's FileExpired: the object changed between the open (its ETag) and the read. Not any EBUSY:
    s3fs also raises that for a store that stays busy (503, SlowDown) once its own retries are spent."""
    try:
        from s3fs.utils import FileExpired  # s3fs is optional: without it nothing raises this
    except ImportError:
        return False
    return isinstance(exc, FileExpired)


@dataclass(frozen=True)
class StorageProblem:
    """Why the object store cannot be used, in one line (`reason`), and whether a retry can help:
    missing credentials are the environment's configuration (`passing` False), an endpoint that
    cannot be reached may come back (True)."""

    reason: str
    passing: bool


def storage_problem(exc: BaseException) -> StorageProblem | None:
    """The problem when `exc` says the object store cannot be used, else None: no usable credentials
    (botocore's "Unable to locate credentials", a missing or partial profile), or no connection to its
    endpoint (a mistyped `endpoint_url`, nothing listening, no network). Such an error is the user's
    environment, not a fault of our code, so commands report it in one line, without a traceback.
    The reason names the endpoint's scheme, host and port only: never a key, a query or a user name."""
    try:
        from botocore import exceptions as boto  # only installed with s3fs; imported on this error path alone
    except ImportError:
        return None
    kinds = (boto.NoCredentialsError, boto.PartialCredentialsError, boto.ProfileNotFound, boto.CredentialRetrievalError)
    if isinstance(exc, kinds):
        return StorageProblem(
            f"object storage credentials: {exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or storage_options in the config)",
            passing=False,
        )
    if isinstance(exc, (boto.EndpointConnectionError, boto.ConnectTimeoutError)):
        parts = urlsplit(str(exc.kwargs.get("endpoint_url", "")))
        endpoint = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        cause = exc.kwargs.get("error")
        why = getattr(getattr(cause, "os_error", None), "strerror", None) or "no connection"
        return StorageProblem(
            f"object store endpoint {endpoint} could not be reached ({why}; check storage_options.endpoint_url "
            "or AWS_ENDPOINT_URL, and the network)",
            passing=True,
        )
    return None
