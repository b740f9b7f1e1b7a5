"""A lease on one retraining key, so two steps never fine-tune the same key at once.

Leases are numbered files `lease-NNNNNN.json` created with `fs.put_exclusive` (S3 `If-None-Match`),
so of two steps racing for a generation exactly one wins. The holder rewrites its file every third
of `lease_seconds` with a growing beat count, and marks it `released` when its step ends. A step that
finds a lease held watches it for up to `lease_seconds` on its own clock (no clocks are compared
across machines), looking every few seconds: a lease whose beat moved, or a newer generation, belongs
to a live step, and it backs off; a released lease is free, and it takes the next generation at once
(its step then finds the key done, or redoes the work of a holder that failed); a lease unchanged all
along is a dead step's, and it takes the next generation, which resumes the dead step's work. A
holder that was only slow (its beats did not get through) finds the newer generation at its next
beat and marks itself `lost`. Its work must then stop writing: `Lease.taken` is a check its
fine-tune asks before each write.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass

from pipeline.io import fs

logger = logging.getLogger(__name__)

_NAME = re.compile(r"lease-(\d{6})\.json$")
# A step waiting on a held lease looks this often, so a holder that ends meanwhile frees the key within
# seconds rather than after the whole `lease_seconds`; a beat, or the lease unchanged that long, decides.
_POLL_SECONDS = 5.0
_ALIVE, _RELEASED, _DEAD = "alive", "released", "dead"


@dataclass(frozen=True)
class Taken:
    """`taken()`: True once a newer generation than `generation` exists in `folder` (lists it now). Plain
    data, so it pickles to training workers on other machines."""

    folder: str
    generation: int
    storage_options: dict | None = None

    def newer(self) -> bool:
        """True once a newer generation exists; the store's errors reach the caller."""
        return latest_generation(self.folder, self.storage_options) != self.generation

    def __call__(self) -> bool:
        try:
            return self.newer()
        except Exception as exc:  # a store that fails to list now (OSError, botocore...) says nothing of the lease
            logger.warning("could not list %s to check the lease: %s", self.folder, exc)
            return False


def _lease_url(folder: str, generation: int) -> str:
    """The file of lease `generation` in `folder` (its number matches `_NAME`)."""
    return fs.join(folder, f"lease-{generation:06d}.json")


class Lease:
    """A held lease; renew it from a thread with `start()`, give it up with `release()`."""

    def __init__(self, folder: str, generation: int, seconds: float, storage_options: dict | None) -> None:
        self.url = _lease_url(folder, generation)
        self.folder, self.generation, self.seconds = folder, generation, seconds
        self.holder = uuid.uuid4().hex
        self.storage_options = storage_options
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)

    def content(self, beat: int, released: bool = False) -> bytes:
        return json.dumps({"holder": self.holder, "beat": beat, "released": released}).encode()

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _renew(self) -> None:
        beat = 0
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.still_held():  # taken for dead (missed beats): stop, and say so to the step
                    logger.warning("lost the lease %s to a newer generation; this step must not publish", self.url)
                    self._lost.set()
                    return
                beat += 1
                fs.put_atomic(self.url, self.content(beat), self.storage_options)
            except Exception as exc:  # whatever the store raises (OSError, botocore...): a missed beat is survivable
                logger.warning("could not renew the lease %s: %s", self.url, exc)

    @property
    def lost(self) -> bool:
        """True once a renewal found that another step took a newer generation."""
        return self._lost.is_set()

    @property
    def taken(self) -> Taken:
        """The check whether another step took a newer generation (this one was taken for dead)."""
        return Taken(self.folder, self.generation, self.storage_options)

    def still_held(self) -> bool:
        """False once another step took a newer generation (this one was taken for dead); lists now."""
        return not self.taken.newer()

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        fs.put_atomic(self.url, self.content(-1, released=True), self.storage_options)


def latest_generation(folder: str, storage_options: dict | None = None) -> int | None:
    found = [_NAME.search(n) for n in fs.listdir(folder, storage_options) if not fs.is_temp_name(n)]
    numbers = [int(m.group(1)) for m in found if m]
    return max(numbers) if numbers else None


def acquire(folder: str, seconds: float, storage_options: dict | None = None) -> Lease | None:
    """The lease of `folder`, or None when a live step holds it (see the module docstring). The
    store's errors reach the caller."""
    while True:
        generation = latest_generation(folder, storage_options)
        if generation is None:
            if (lease := _create(folder, 0, seconds, storage_options)) is not None:
                return lease
            continue
        url = _lease_url(folder, generation)
        seen = fs.read_bytes(url, storage_options)
        if not json.loads(seen)["released"]:
            logger.info("lease %s is held; watching it up to %.0f s to see whether its holder is alive", url, seconds)
            holder = _watch(folder, generation, seen, seconds, storage_options)
            if holder == _ALIVE:
                logger.info("lease %s: its holder is alive", url)
                return None
            if holder == _RELEASED:
                logger.info("lease %s was released: its holder ended; taking the key", url)
            else:
                logger.warning("lease %s was not renewed for %.0f s: taking over from a dead step", url, seconds)
        lease = _create(folder, generation + 1, seconds, storage_options)
        if lease is None:
            return None  # another step took the same generation first
        return lease


def _watch(folder: str, generation: int, seen: bytes, seconds: float, storage_options: dict | None) -> str:
    """What the holder of lease `generation` (content `seen`) does within `seconds`: _ALIVE (it renewed
    the lease, or a newer generation appeared), _RELEASED (its step ended) or _DEAD (nothing changed)."""
    url = _lease_url(folder, generation)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, _POLL_SECONDS))
        if latest_generation(folder, storage_options) != generation:
            return _ALIVE
        now = fs.read_bytes(url, storage_options)
        if now != seen:
            return _RELEASED if json.loads(now)["released"] else _ALIVE
    return _DEAD


def _create(folder: str, generation: int, seconds: float, storage_options: dict | None) -> Lease | None:
    lease = Lease(folder, generation, seconds, storage_options)
    if fs.put_exclusive(lease.url, lease.content(0), storage_options):
        return lease.start()
    return None
