"""The actor pool: a queue of shards handed one at a time to whichever actor is free, with retries.

Each actor builds its model once (from the config, never from an object shipped by the driver) and
then labels shard after shard, so a slow shard only ever occupies its own actor. A shard whose actor
dies is put back on the queue and a fresh actor takes the dead one's place. An actor that dies while
its model loads (killed, out of memory, its node lost) is replaced the same way, but until a first
model is up only `n_actors * (1 + max_retries)` actors are started in all: when every one of them died
loading (a model too big for the node), or the cluster cancelled them (a driver whose Ray token
authentication differs) or refused to create the first, the pool raises `ModelStartError` rather
than load the model once per shard attempt. Only an exception raised by the model's construction,
before any model has started, is a bad config (ValueError). A shard whose attempt raises (an
unreadable tar) is put back too. After `1 + max_retries` attempts it is recorded as a failed shard
with the last reason. This is the only retry logic of the job.

Ctrl-C or SIGTERM once: no new shards are handed out, in-flight shards finish and commit. Twice:
in-flight shards are abandoned (their actors killed; their partial files carry temporary names
and are removed by the caller). Either way the pool returns with `interrupted` set.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from pipeline import schema
from pipeline.config import DistributeCfg, RunCfg
from pipeline.distribute.actor import LabelActor
from pipeline.distribute.progress import Progress
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

_WAIT_S = 0.5  # how often the loop wakes to notice a stop request
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACTOR_PREFIX = "clipdense-label-"  # actors are named <prefix><run id>-<n> (visible in `ray list actors`)


class ModelStartError(RuntimeError):
    """No actor ever came up: every one started so far died while its model loaded or was cancelled,
    or the cluster refused to create the first. The cluster cannot run this model (out of memory,
    nodes lost, Ray authentication): a failure of the run, not a bad config."""


@dataclass
class ShardOutcome:
    """How one shard ended in this run: committed (`marker`), failed (`error`), or not finished."""

    url: str
    attempts: int = 0
    marker: dict[str, Any] | None = None
    error: str | None = None  # last failure reason
    status: str = "pending"  # committed | failed | abandoned | not_started

    @property
    def name(self) -> str:
        return schema.shard_name(self.url)


@dataclass
class PoolResult:
    outcomes: list[ShardOutcome]
    interrupted: bool = False
    signal_name: str = ""
    retries: int = 0
    labelling_s: float = 0.0  # from the first model ready to the end of the pool
    actors_started: int = 0
    actor_info: list[dict[str, Any]] = field(default_factory=list)


def actor_resources(cfg: DistributeCfg, n_shards: int) -> tuple[int, float, float]:
    """(number of actors, CPUs each, GPUs each) for this cluster: one per GPU when it has GPUs."""
    cluster = ray.cluster_resources()
    gpus = cluster.get("GPU", 0.0)
    num_gpus = cfg.num_gpus if cfg.num_gpus >= 0 else (1.0 if gpus >= 1 else 0.0)
    if cfg.num_actors > 0:
        n = cfg.num_actors
    elif num_gpus > 0:
        n = int(gpus // num_gpus)
    else:
        n = int(cluster.get("CPU", 1.0) // max(cfg.num_cpus, 1e-6))
    return max(1, min(n, n_shards)), cfg.num_cpus, num_gpus


class StopRequest:
    """Counts stop requests (signals, or `request()` from code); 1 = drain, 2 = abandon."""

    def __init__(self) -> None:
        self.count = 0
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def request(self, name: str = "stop") -> None:
        self.count += 1
        self.signal_name = self.signal_name or name
        if self.count == 1:
            logger.warning("%s: finishing the shards in flight, starting no new ones (again to abandon them)", name)
        else:
            logger.warning("%s again: abandoning the shards in flight", name)

    def install(self) -> None:
        """Catch SIGINT and SIGTERM (only possible on the main thread; elsewhere use `request`). Calling
        it again re-takes the signals (after a library set its own) and keeps the first previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, lambda signum, _frame: self.request(signal.Signals(signum).name))
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def run_pool(
    cfg: RunCfg,
    vocab: Vocabulary,
    urls: list[str],
    on_ready: Callable[[dict[str, Any]], None],
    stop: StopRequest,
) -> PoolResult:
    """Label `urls` on a pool of actors; `on_ready(info)` is called once, when the first model is up."""
    return _Pool(cfg, vocab, urls, on_ready).run(stop)


class _Pool:
    """The state of one `run_pool` call: actors starting, idle and busy, and the shard queue."""

    def __init__(self, cfg: RunCfg, vocab: Vocabulary, urls: list[str], on_ready: Callable) -> None:
        self.cfg, self.vocab, self.on_ready = cfg, vocab, on_ready
        self.n_actors, self.num_cpus, self.num_gpus = actor_resources(cfg.distribute, len(urls))
        self.result = PoolResult(outcomes=[ShardOutcome(url) for url in urls])
        self.queue: deque[ShardOutcome] = deque(self.result.outcomes)
        self.max_attempts = 1 + cfg.distribute.max_retries
        self.starting: dict[ray.ObjectRef, Any] = {}  # describe() call -> actor
        self.running: dict[ray.ObjectRef, tuple[Any, ShardOutcome]] = {}  # label() call -> (actor, shard)
        self.idle: deque[Any] = deque()  # first in, first out: a retry goes to another actor when one is free
        self.progress = Progress(len(urls), cfg.distribute.log_interval)
        self.run_id = uuid.uuid4().hex[:8]
        # Dead actors are replaced; the budget stops a crash loop from spinning forever.
        self.spawn_budget = self.n_actors + len(urls) * self.max_attempts
        # Until a model is up, an actor slot gets as many tries as a shard: a model that kills every actor
        # while loading must not be loaded once per shard attempt (hours of loads on 10k shards).
        self.startup_budget = self.n_actors * self.max_attempts

    def run(self, stop: StopRequest) -> PoolResult:
        shards, actors, cpus, gpus = len(self.queue), self.n_actors, self.num_cpus, self.num_gpus
        logger.info("labelling %d shards on %d actors (%g CPU, %g GPU each)", shards, actors, cpus, gpus)
        try:
            for _ in range(self.n_actors):
                self._spawn()
            while (self.queue or self.running) and stop.count < 2:
                while self.idle and self.queue and not stop.count:
                    actor, outcome = self.idle.popleft(), self.queue.popleft()
                    outcome.attempts += 1
                    self.running[actor.label.remote(outcome.url, outcome.attempts)] = (actor, outcome)
                if not self.running and (stop.count or not self.starting):
                    if not stop.count:
                        self._fail_queue("no worker left to run it")
                    break
                ready, _ = ray.wait([*self.starting, *self.running], num_returns=1, timeout=_WAIT_S)
                self.progress.tick()
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._finished(ref)
        finally:
            self._wind_up()
        self.result.interrupted, self.result.signal_name = stop.count > 0, stop.signal_name
        return self.result

    def _spawn(self) -> None:
        self.spawn_budget -= 1
        name = f"{ACTOR_PREFIX}{self.run_id}-{self.result.actors_started}"
        options = {"name": name, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0}
        try:
            actor = ray.remote(LabelActor).options(**options).remote(self.cfg, self.vocab)
        except RayError as exc:  # the cluster refused to create it
            reason = _reason(exc)
            if not self.result.actor_info and not self.starting:  # no actor is up, nor coming up
                raise ModelStartError(
                    f"the labeling model could not start: the cluster refused its actor: {_with_hint(reason)}"
                ) from None
            logger.error("the cluster refused to create an actor: %s", reason)
            return
        self.starting[actor.describe.remote()] = actor
        self.result.actors_started += 1

    def _started(self, ref: ray.ObjectRef) -> None:
        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as exc:
            # Raised by the model's construction (or by describe); not when the actor's process or node
            # died, its result was lost or the cluster cancelled it.
            raised = (isinstance(exc, RayActorError) and exc.actor_init_failed) or isinstance(exc, RayTaskError)
            if raised and not self.result.actor_info:  # no model has ever started: the config cannot work
                raise ValueError(f"the labeling model could not start: {_reason(exc)}") from None
            logger.error("an actor %s: %s", "failed to start" if raised else "died while starting", _reason(exc))
            ray.kill(actor)
            if raised or self.spawn_budget <= 0:
                return
            if self.result.actor_info or self.result.actors_started < self.startup_budget:
                self._spawn()
            elif not self.starting:  # the last actor of the start-up budget died too
                n = self.result.actors_started
                raise ModelStartError(
                    f"the labeling model could not start: all {n} actors died while loading it; "
                    f"last: {_with_hint(_reason(exc))}"
                ) from None
            return
        if not self.result.actor_info:
            self.on_ready(info)
            self.progress.restart_clock()
        self.result.actor_info.append(info)
        self.idle.append(actor)

    def _finished(self, ref: ray.ObjectRef) -> None:
        actor, outcome = self.running.pop(ref)
        try:
            outcome.marker = ray.get(ref)
        except RayTaskError as exc:  # the attempt raised; the actor itself is fine
            self.idle.append(actor)
            self._retry(outcome, _reason(exc))
        except RayError as exc:  # the actor died (or its node, or its result): replace it
            ray.kill(actor)
            self._retry(outcome, f"worker died: {_reason(exc)}")
            if self.spawn_budget > 0:
                self._spawn()
        else:
            outcome.status, outcome.error = "committed", None
            self.progress.shard_done(True, outcome.marker["ok"], outcome.marker["failed"])
            self.idle.append(actor)

    def _retry(self, outcome: ShardOutcome, reason: str) -> None:
        outcome.error = reason
        if outcome.attempts < self.max_attempts:
            self.result.retries += 1
            logger.warning("shard %s attempt %d failed (%s); retrying", outcome.name, outcome.attempts, reason)
            self.queue.append(outcome)
        else:
            outcome.status = "failed"
            logger.error("shard %s failed after %d attempts: %s", outcome.name, outcome.attempts, reason)
            self.progress.shard_done(ok=False)

    def _fail_queue(self, reason: str) -> None:
        for outcome in self.queue:
            outcome.status, outcome.error = "failed", outcome.error or reason
            self.progress.shard_done(ok=False)
        self.queue.clear()

    def _wind_up(self) -> None:
        """Record shards still in flight as abandoned and the rest as not started; stop every actor."""
        for _, outcome in self.running.values():
            outcome.status = "abandoned"
        for outcome in self.result.outcomes:
            if outcome.status == "pending":
                outcome.status = "not_started"
        for actor in [*self.idle, *self.starting.values(), *(a for a, _ in self.running.values())]:
            ray.kill(actor)
        self.progress.close()
        if self.result.actor_info:
            self.result.labelling_s = time.monotonic() - self.progress.started


def _with_hint(reason: str) -> str:
    """`reason` with the likely cause of actors that the cluster cancelled, which Ray's message leaves out."""
    if "cancelled" not in reason.lower():
        return reason
    mode = os.environ.get("RAY_AUTH_MODE", "")
    here = f" (RAY_AUTH_MODE={mode} here)" if mode else ""
    return (
        f"{reason.rstrip('.')}. The likely cause: a cluster cancels the actors of a driver whose Ray token "
        f"authentication differs from its own{here}; run the job with the cluster's RAY_AUTH_MODE and token, "
        "or submit it (clipdense submit)"
    )


def _reason(exc: BaseException) -> str:
    """The user-facing cause of a Ray error: the remote exception itself when there is one (for an actor
    that died in `__init__`, the last line of the creation task's traceback), else Ray's last line."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
