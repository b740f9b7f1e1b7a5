"""The labeling job from config to summary: plan the shards, check the output, run the pool, report.

    expand input → resolve vocabulary → prepare output (resume or refuse) → connect to Ray
    → label the shards not yet committed → remove partial files → summary (`_run/summary.json`)

Exit codes in the summary: 0 when every input shard is committed, 1 when some failed, 130/143 when
a SIGINT/SIGTERM stopped the run (1 for a stop requested from code).

The summary describes the whole output for this input, not only this invocation: its sample counts
and errors add up the commit markers of every committed input shard, those of earlier runs included,
so after a resume it still reports the failed rows an earlier run wrote. What this invocation did is
under `labelled_now`, `retries`, `images_per_s` and `seconds_by_phase`; `head`, the head that
labelled (the model's own when the config names none; null when no model started); `precision` per actor (what
`model.precision` became, and the probe's rates when `auto` chose on a CPU), and under `actors` each
one's `torch_threads`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray

from pipeline import schema
from pipeline.config import RunCfg, config_hash
from pipeline.distribute.driver import PoolResult, ShardOutcome, StopRequest, run_pool
from pipeline.distribute.reaper import Reaper
from pipeline.io.shards import expand_shards
from pipeline.obs import CappedCounter
from pipeline.outputs import (
    canonical_config,
    prepare_output,
    read_markers,
    remove_temporaries,
    write_summary,
    write_vocabulary,
)
from pipeline.vocab import Vocabulary, resolve_vocabulary

logger = logging.getLogger(__name__)

_reaper: Reaper | None = None  # watches the embedded Ray instance `connect` started, if any
_PHASES = ("read_s", "wait_s", "infer_s", "write_s", "backpressure_s", "commit_s", "wall_s")


def plan_shards(cfg: RunCfg) -> list[str]:
    """Input shard URLs; refuses two inputs with the same name, which would share one output name."""
    if not cfg.input:
        raise ValueError("no input: set `input` to shard URLs, a brace pattern, a glob or a folder")
    if not cfg.output:
        raise ValueError("no output: set `output` to the URL the labels are written to")
    urls = expand_shards(cfg.input, cfg.storage_options)
    seen: dict[str, str] = {}
    for url in urls:
        name = schema.shard_name(url)
        if name in seen:
            raise ValueError(f"input shards {seen[name]} and {url} have the same name {name!r}; outputs would collide")
        seen[name] = url
    return urls


def connect(address: str) -> bool:
    """Join the Ray cluster at `address`, or the job's cluster (RAY_ADDRESS, set for submitted jobs),
    or start an embedded local instance, watched by a `Reaper` so that it never outlives this
    process. Returns True when this call connected (and `disconnect` should follow).

    Raises:
        ValueError: no cluster could be joined at the address.
        SystemExit: a SIGTERM arrived while Ray was starting (Ray's own handler, set by `ray.init`);
            like any other error of `ray.init`, it shuts down what had started and releases the reaper.
    """
    global _reaper
    if ray.is_initialized():
        return False
    if _reaper is not None:  # an earlier instance was shut down by `ray.shutdown()`, not `disconnect`
        _reaper.release()
        _reaper = None
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address or None, log_to_driver=True)
        except ConnectionError as exc:  # an address that names no reachable cluster is bad input
            where = address or os.environ["RAY_ADDRESS"]
            raise ValueError(f"cannot join the Ray cluster at {where}: {str(exc).strip().splitlines()[-1]}") from None
    else:
        reaper = Reaper()
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        except BaseException:  # else the token stays in os.environ and marks later subprocesses for the reaper
            try:
                ray.shutdown()
            finally:
                reaper.release()
            raise
        reaper.started()
        _reaper = reaper
    return True


def disconnect() -> None:
    """Shut down what `connect` started (and release its reaper)."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.release()
        _reaper = None


def run_label_job(cfg: RunCfg, overwrite: bool = False, stop: StopRequest | None = None) -> dict[str, Any]:
    """Label every input shard of `cfg` not yet committed under `cfg.output`; returns the summary."""
    started = time.monotonic()
    cfg = canonical_config(cfg)  # one spelling per path: config.yaml, config_hash and resume all agree
    urls = plan_shards(cfg)
    vocab = resolve_vocabulary(cfg.vocab, near=urls[0].rsplit("/", 1)[0], storage_options=cfg.storage_options)
    committed = prepare_output(cfg, vocab, overwrite)
    todo = [url for url in urls if schema.shard_name(url) not in committed]
    logger.info("%d input shards: %d already committed, %d to label", len(urls), len(urls) - len(todo), len(todo))
    stop = stop or StopRequest()
    pool = PoolResult(outcomes=[])
    if todo:
        stop.install()  # from here a signal is a stop request, Ray's start-up included
        shutdown = False
        try:
            try:
                shutdown = connect(cfg.distribute.address)
            except SystemExit:  # ray.init turns a SIGTERM into SystemExit while it runs
                shutdown = True
                stop.request("SIGTERM")
            stop.install()  # again: ray.init sets its own SIGTERM handler
            if stop.count:
                pool = PoolResult([ShardOutcome(u, status="not_started") for u in todo], True, stop.signal_name)
            else:
                pool = run_pool(cfg, vocab, todo, _vocabulary_writer(cfg, vocab), stop)
        finally:
            stop.restore()
            if shutdown:
                disconnect()
    remove_temporaries(cfg.output, cfg.storage_options)
    earlier = read_markers(cfg.output, [schema.shard_name(u) for u in urls if u not in todo], cfg.storage_options)
    summary = summarize(cfg, urls, earlier, pool, time.monotonic() - started)
    write_summary(cfg.output, summary, cfg.storage_options)
    return summary


def _vocabulary_writer(cfg: RunCfg, vocab: Vocabulary):
    def on_ready(info: dict[str, Any]) -> None:
        logger.info(
            "model ready on %s (head %s, %s, precision %s, %d torch threads)",
            *(info[k] for k in ("host", "head", "device", "precision", "torch_threads")),
        )
        write_vocabulary(cfg.output, vocab, info["templates"], info["text_embedding_sha256"], cfg.storage_options)

    return on_ready


def _summed_counts(markers: list[dict[str, Any]], section: str, field: str) -> dict[str, int]:
    """The counts by kind of `marker[section][field]`, summed over all markers (older markers may lack them)."""
    total: dict[str, int] = {}
    for marker in markers:
        for kind, n in marker.get(section, {}).get(field, {}).items():
            total[kind] = total.get(kind, 0) + n
    return total


def summarize(
    cfg: RunCfg, urls: list[str], earlier: list[dict[str, Any]], pool: PoolResult, seconds: float
) -> dict[str, Any]:
    """The summary of the output after this run: shard counts, failed shards with reasons, sample
    counts over every committed shard (`earlier` holds the markers of shards committed before this
    run), what this run labelled, its speed, and the exit code.

    `images_per_s` is over the labelling time, from the first model ready to the end (start-up excluded)."""
    by_status: dict[str, int] = {}
    for outcome in pool.outcomes:
        by_status[outcome.status] = by_status.get(outcome.status, 0) + 1
    markers = [o.marker for o in pool.outcomes if o.marker is not None]
    skipped = len(earlier)
    everything = [*earlier, *markers]
    errors = CappedCounter()
    for marker in everything:
        for reason, n in marker["errors"].items():
            errors.add(reason, n)
    ok = sum(m["ok"] for m in markers)
    incomplete = sorted(
        m["shard"]
        for m in everything
        if m.get("read", {}).get("end_of_archive") is False or m.get("read", {}).get("data_after_end")
    )
    phases = {p: round(sum(m["stats"].get(p, 0.0) for m in markers), 3) for p in _PHASES}
    committed = skipped + by_status.get("committed", 0)
    if pool.interrupted:
        exit_code = {"SIGINT": 130, "SIGTERM": 143}.get(pool.signal_name, 1)
    else:
        exit_code = 0 if committed == len(urls) else 1
    return {
        "output": cfg.output,
        "config_hash": config_hash(cfg),
        "head": pool.actor_info[0]["head"] if pool.actor_info else None,  # what labelled, named or not
        "exit_code": exit_code,
        "interrupted": pool.interrupted,
        "shards": {
            "total": len(urls),
            "committed": committed,
            "skipped": skipped,
            "labelled": by_status.get("committed", 0),
            "failed": by_status.get("failed", 0),
            "abandoned": by_status.get("abandoned", 0),
            "not_started": by_status.get("not_started", 0),
        },
        "failed_shards": [
            {"shard": o.name, "input": o.url, "attempts": o.attempts, "error": o.error}
            for o in pool.outcomes
            if o.status == "failed"
        ],
        "samples": {  # the whole output: every committed input shard, this run's and earlier ones
            "ok": sum(m["ok"] for m in everything),
            "failed": sum(m["failed"] for m in everything),
            "errors": errors.to_dict(),
            # tar members that are not samples (hidden files, WebDataset metadata), by kind
            "skipped_members": _summed_counts(everything, "read", "skipped"),
        },
        "zoom_skipped": _summed_counts(everything, "stats", "zoom_skipped"),  # proposals dropped, boxes skipped
        "labelled_now": {"ok": ok, "failed": sum(m["failed"] for m in markers)},
        # committed, but their input tar ends early, is corrupt, or holds data after its end (marker `read`)
        "cut_shards": incomplete,
        "retries": pool.retries,
        "actors": {
            "started": pool.actors_started,
            "ready": len(pool.actor_info),
            "torch_threads": {f"{a['host']}:{a['pid']}": a["torch_threads"] for a in pool.actor_info},
        },
        "precision": {f"{a['host']}:{a['pid']}": a["precision"] for a in pool.actor_info},
        "seconds": round(seconds, 3),
        "images_per_s": round(ok / pool.labelling_s, 3) if ok and pool.labelling_s > 0 else 0.0,
        "labelling_s": round(pool.labelling_s, 3),
        "seconds_by_phase": phases,
    }
