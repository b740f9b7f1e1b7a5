"""The actor pool: a queue of shards handed one at a time to whichever actor is free, with retries.

Each actor builds its model once (from the config, never from an object shipped by the driver) and
then labels shard after shard, so a slow shard only ever occupies its own actor. A shard whose actor
dies is put back on the queue and a fresh actor takes the dead one's place; a shard whose attempt
raises (an unreadable tar) is put back too. After `1 + max_retries` attempts it is recorded as a
failed shard with the last reason. This is the only retry logic of the job.

Ctrl-C or SIGTERM once: no new shards are handed out, in-flight shards finish and commit. Twice:
in-flight shards are abandoned (their actors killed; their partial files carry temporary names
and are removed by the caller). Either way the pool returns with `interrupted` set.
"""

from __future__ import annotations

import logging
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
from ray.exceptions import RayError, RayTaskError

from pipeline import schema
from pipeline.config import DistributeCfg, RunCfg
from pipeline.distribute.actor import LabelActor
from pipeline.distribute.progress import Progress
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

_WAIT_S = 0.5  # how often the loop wakes to notice a stop request
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACTOR_PREFIX = "clipdense-label-"  # actors are named <prefix><run id>-<n> (visible in `ray list actors`)


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
        """Catch SIGINT and SIGTERM (only possible on the main thread; elsewhere use `request`)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, lambda signum, _frame: self.request(signal.Signals(signum).name))

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
    n_actors, num_cpus, num_gpus = actor_resources(cfg.distribute, len(urls))
    logger.info("labelling %d shards on %d actors (%g CPU, %g GPU each)", len(urls), n_actors, num_cpus, num_gpus)
    actor_cls = ray.remote(LabelActor)
    result = PoolResult(outcomes=[ShardOutcome(url) for url in urls])
    queue: deque[ShardOutcome] = deque(result.outcomes)
    max_attempts = 1 + cfg.distribute.max_retries
    starting: dict[ray.ObjectRef, Any] = {}  # describe() call → actor
    running: dict[ray.ObjectRef, tuple[Any, ShardOutcome]] = {}
    idle: list[Any] = []
    progress = Progress(len(urls), cfg.distribute.log_interval)
    run_id = uuid.uuid4().hex[:8]
    # Actors may die and be replaced; bound replacements so a crash loop cannot spin forever.
    spawn_budget = n_actors + len(urls) * max_attempts

    def spawn() -> None:
        nonlocal spawn_budget
        spawn_budget -= 1
        name = f"{ACTOR_PREFIX}{run_id}-{result.actors_started}"
        actor = actor_cls.options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0).remote(cfg, vocab)
        starting[actor.describe.remote()] = actor
        result.actors_started += 1

    def give_back(outcome: ShardOutcome, reason: str) -> None:
        outcome.error = reason
        if outcome.attempts < max_attempts:
            result.retries += 1
            logger.warning("shard %s attempt %d failed (%s); retrying", outcome.name, outcome.attempts, reason)
            queue.append(outcome)
        else:
            outcome.status = "failed"
            logger.error("shard %s failed after %d attempts: %s", outcome.name, outcome.attempts, reason)
            progress.shard_done(ok=False)

    for _ in range(n_actors):
        spawn()
    try:
        while queue or running:
            if stop.count >= 2:
                break
            while idle and queue and not stop.count:
                actor, outcome = idle.pop(), queue.popleft()
                outcome.attempts += 1
                running[actor.label.remote(outcome.url, outcome.attempts)] = (actor, outcome)
            if not running and (stop.count or not starting):
                for outcome in queue if not stop.count else ():
                    outcome.status, outcome.error = "failed", outcome.error or "no worker left to run it"
                    progress.shard_done(ok=False)
                break
            ready, _ = ray.wait([*starting, *running], num_returns=1, timeout=_WAIT_S)
            progress.tick()
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except RayError as exc:
                        if not result.actor_info:  # no model has ever started: the config cannot work
                            raise ValueError(f"the labeling model could not start: {_reason(exc)}") from None
                        logger.error("an actor failed to start: %s", _reason(exc))
                        continue
                    if not result.actor_info:
                        on_ready(info)
                        progress.restart_clock()
                    result.actor_info.append(info)
                    idle.append(actor)
                    continue
                actor, outcome = running.pop(ref)
                try:
                    outcome.marker = ray.get(ref)
                except RayTaskError as exc:  # the attempt raised; the actor itself is fine
                    idle.append(actor)
                    give_back(outcome, _reason(exc))
                except RayError as exc:  # the actor died (or its node, or its result): replace it
                    ray.kill(actor)
                    give_back(outcome, f"worker died: {_reason(exc)}")
                    if spawn_budget > 0:
                        spawn()
                else:
                    outcome.status, outcome.error = "committed", None
                    progress.shard_done(True, outcome.marker["ok"], outcome.marker["failed"])
                    idle.append(actor)
    finally:
        for _, outcome in running.values():
            outcome.status = "abandoned"
        for outcome in result.outcomes:
            if outcome.status == "pending":
                outcome.status = "not_started"
        for actor in [*idle, *starting.values(), *(a for a, _ in running.values())]:
            ray.kill(actor)
        progress.close()
    if result.actor_info:
        result.labelling_s = time.monotonic() - progress.started
    result.interrupted = stop.count > 0
    result.signal_name = stop.signal_name
    return result


def _reason(exc: BaseException) -> str:
    """The user-facing cause of a Ray error: the remote exception itself when there is one (for an actor
    that died in `__init__`, the last line of the creation task's traceback), else Ray's last line."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
