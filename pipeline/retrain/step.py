"""One retraining step: new committed label shards -> fine-tune -> gate on held-out truth -> publish.

A step is keyed by (watermark, config): the exact committed shards it trains on and everything in
its config that decides the result. It does, in order:
1. list the committed shards (`watermark`); if there are none yet, or they are what the live
   version was trained on, or this key already finished (published or not), stop: exit 0, nothing
   written; runs the fine-tune cannot train on (data.combine=agree and one run) are an error here;
2. open the truth set (a wrong `truth` fails here, before any lease or training), then take the
   key's lease (`lease`); a live step holding it means stop;
3. fine-tune from the live version (the labeler's own CLIP for the first) into `_steps/<key>/train`,
   continuing its student too unless the fine-tune sets `warm_start: false`; a rerun resumes that
   fine-tune from its checkpoint;
4. score the live version (the labeler's own CLIP for the first) and the candidate on the truth set;
5. publish `vNNNN/` and move `latest` only if the candidate wins (`versions.publish`); the first
   version is published whatever its score unless `gate_first` (there is no live version to beat);
   if another step moved `latest` since step 1, the version stays unpointed-to ("superseded"); a
   step whose lease was taken over meanwhile publishes nothing and writes only its record;
6. write `_steps/<key>/done.json` and a record under `records/` saying what was done and why, then
   remove the fine-tune's checkpoints and exported model (its metrics and summary stay).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import ModelCfg, to_dict
from pipeline.eval.truth import TruthSet, open_truth
from pipeline.io import fs
from pipeline.outputs import read_run_config
from pipeline.retrain import lease, score, versions, watermark
from pipeline.retrain.config import EXECUTION_KEYS, RetrainCfg, canonical_retrain_config, check, check_runs
from pipeline.train.checkpoint import CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# train(start model, labeling run outputs, output folder, storage_options, stop) -> the fine-tune's
# summary. `stop()` turns True once the step lost its lease; the trainer then ends without writing more
# to `output` (by raising, or by returning).
Trainer = Callable[[ModelCfg, list[str], str, dict | None, Callable[[], bool]], dict]
DONE = "done.json"
LOST = "lost-lease"  # outcome of a step taken for dead while it worked
_LOST = {"outcome": LOST, "reason": "lost the lease to another step, which redoes this key"}
TRAIN_DIR = "train"  # the fine-tune's output folder under _steps/<key>/


def step_key(cfg: RetrainCfg, mark: watermark.Watermark) -> str:
    """Key of a step: its watermark and every config value that decides what it produces."""
    decisive = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_KEYS}
    text = json.dumps({"watermark": watermark.digest(mark), "config": decisive}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def retrain_step(cfg: RetrainCfg, train: Trainer) -> dict[str, Any]:
    """Run one step (module docstring); return its record. `outcome` is one of: nothing-new,
    already-done, held (another live step has the key), published, not-better, superseded (another
    step moved `latest` while this one trained), lost-lease (taken for dead while it worked).

    Raises ConfigError or ValueError naming the key for a bad config, a local `labels` folder that
    does not exist, listed runs the fine-tune cannot train on (`check_runs`) or a `truth` that holds
    no truth set, before taking the lease or training."""
    check(cfg)
    cfg = canonical_retrain_config(cfg)
    so = cfg.storage_options or None
    mark = watermark.current_watermark(cfg.labels, so)
    live = versions.read_latest(cfg.models, so)
    trained = watermark.canonical(live["watermark"]) if live else {}
    key = step_key(cfg, mark)
    record: dict[str, Any] = {
        "key": key,
        "shards": sum(len(s) for s in mark.values()),
        "new_shards": watermark.new_shards(mark, trained),
        "live_version": live["version"] if live else None,
    }
    if not any(mark.values()):  # a first deploy: the CronJob runs before any labeling run committed
        logger.info("no committed label shard yet in %s: nothing to train on", ", ".join(cfg.labels))
        return {**record, "outcome": "nothing-new", "reason": "no committed label shard yet"}
    check_runs(cfg, sorted(mark))  # what the fine-tune would refuse only after the lease (combine=agree, one run)
    if live and watermark.digest(trained) == watermark.digest(mark):
        _repair_record(fs.join(cfg.models, versions.STEPS_DIR, live["key"]), live, so)
        return {**record, "outcome": "nothing-new", "reason": f"{live['version']} was trained on these shards"}
    folder = fs.join(cfg.models, versions.STEPS_DIR, key)
    if fs.exists(fs.join(folder, DONE), so):
        return {**_repair_record(folder, None, so), "outcome": "already-done"}
    # Opened before the lease and the fine-tune, so a mistyped truth costs neither.
    truth = _open_truth(cfg.truth, so)
    held = lease.acquire(folder, cfg.lease_seconds, so)
    if held is None:
        return {**record, "outcome": "held", "reason": "another step is working on this key"}
    try:
        if fs.exists(fs.join(folder, DONE), so):  # it finished while we waited for its lease
            return {**_repair_record(folder, None, so), "outcome": "already-done"}
        # The record's URL is fixed before publishing and goes into version.json, so whatever point
        # a kill stops this step at, a later step can write the same record (`_repair_record`).
        record["record"] = versions.record_url(cfg.models, key)
        record = _train_and_gate(cfg, record, mark, live, held, train, truth)
        if record["outcome"] == LOST:  # done.json and the training folder are the new holder's
            fs.put_json(record["record"], record, so)
            return record
        fs.put_json(fs.join(folder, DONE), record, so)
        fs.put_json(record["record"], record, so)
        _drop_training_state(folder, so)
    finally:
        held.release()
    return record


def _repair_record(folder: str, published: dict[str, Any] | None, storage_options: dict | None) -> dict[str, Any]:
    """Finish the bookkeeping of the step in `folder` that a kill cut short; return its done.json.

    The step writes version.json (holding its whole record), moves `latest`, writes done.json, then
    the record. Killed after `latest` moved, its done.json is rebuilt from `published` (the live
    version.json; its key's rerun is nothing-new and would never write it); killed after done.json,
    the record is rewritten from it, at the URL it names. Both are no-ops when nothing is missing.
    """
    done_url = fs.join(folder, DONE)
    if not fs.exists(done_url, storage_options):
        if not published or "record" not in published:
            return {}
        logger.info("%s was published by a step killed before its record; writing it", published["version"])
        fs.put_json(done_url, published, storage_options)
    done = fs.read_json(done_url, storage_options)
    if done.get("record") and not fs.exists(done["record"], storage_options):
        logger.info("writing the record %s a killed step did not write", done["record"])
        fs.put_json(done["record"], done, storage_options)
    return done


def _open_truth(specs: list[str], storage_options: dict | None) -> TruthSet:
    """The truth set `specs` name; ValueError naming `truth` and the bad spec when it holds no truth."""
    try:
        return open_truth(specs, "", "", storage_options)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"truth: {exc}") from exc


def _taken_over(held: lease.Lease) -> bool:
    """True once another step took this step's key (its renewals saw it, or a listing does now); a
    listing that fails says no, so a fine-tune's own error is the one raised."""
    return held.lost or held.taken()


def _drop_training_state(folder: str, storage_options: dict | None) -> None:
    """Remove what only a resume or the publish needed: the checkpoints (optimiser state) and the
    exported model (a published version has its own copy). metrics.jsonl and the summary stay."""
    for name in (CHECKPOINT_DIR, versions.MODEL_DIR):
        fs.remove(fs.join(folder, TRAIN_DIR, name), storage_options)


def _train_and_gate(
    cfg: RetrainCfg,
    record: dict[str, Any],
    mark: watermark.Watermark,
    live: dict | None,
    held: lease.Lease,
    train: Trainer,
    truth: TruthSet,
) -> dict[str, Any]:
    """Fine-tune, score and maybe publish; return `record` completed with what was done and why."""
    so = cfg.storage_options or None
    key = record["key"]
    runs = sorted(mark)
    labeler = read_run_config(runs[0], so)
    live_model = fs.join(cfg.models, live["version"], versions.MODEL_DIR) if live else None
    start = ModelCfg(name=live_model) if live_model else labeler.model
    out = fs.join(cfg.models, versions.STEPS_DIR, key, TRAIN_DIR)
    logger.info("fine-tuning from %s on %d labeling runs into %s", start.name, len(runs), out)
    began = time.monotonic()
    trained = {**record, "trained_from": start.name, "trained_on": runs, "watermark": mark}
    try:
        summary = train(start, runs, out, so, held.taken)
    except Exception:
        if not _taken_over(held):
            raise
        logger.warning("fine-tune of step %s ended: another step took its lease", key, exc_info=True)
        return {**trained, **_LOST}
    if _taken_over(held):  # a fine-tune that returned when asked to stop
        logger.warning("lost the lease of step %s to another step while fine-tuning; not scoring", key)
        return {**trained, **_LOST}
    candidate = fs.join(out, versions.MODEL_DIR)
    current = live["version"] if live else f"the labeler's {labeler.model.name}"
    scores = {
        "current": score.score(score.labeler_cfg(labeler, live_model), truth, cfg.eval_batch_size, so),
        "candidate": score.score(score.labeler_cfg(labeler, candidate), truth, cfg.eval_batch_size, so),
    }
    result: dict[str, Any] = {
        **trained,
        "truth": cfg.truth,
        "compared_with": current,
        "mIoU": scores,
        "finetune": {k: summary.get(k) for k in ("final_step", "mIoU", "train_seconds", "n_samples")},
        "seconds": round(time.monotonic() - began, 1),
    }
    if _taken_over(held):  # taken for dead meanwhile: the new holder owns the key now
        logger.warning("lost the lease of step %s to another step; not publishing", key)
        return {**result, **_LOST}
    beats = scores["candidate"] - scores["current"] > cfg.min_gain
    versus = (
        f"candidate mIoU {scores['candidate']:.4f} vs {scores['current']:.4f} of {current} (min_gain {cfg.min_gain})"
    )
    if not beats and (live is not None or cfg.gate_first):
        logger.info("not publishing: %s", versus)
        return {**result, "outcome": "not-better", "reason": f"not better: {versus}"}
    why = f"better: {versus}" if beats else f"first version, nothing live to beat (gate_first is off): {versus}"
    expected = live["version"] if live else None
    # version.json holds the whole record, so a step killed after `latest` moved can be recorded.
    name, moved = versions.publish(
        cfg.models, key, candidate, {**result, "outcome": "published", "reason": why}, expected, so
    )
    if not moved:
        now = versions.live_version(cfg.models, so)
        why = f"superseded: {now} was published while this step gated against {expected or 'no version'}"
        return {**result, "outcome": "superseded", "version": name, "reason": why}
    logger.info("published %s: %s", name, why)
    return {**result, "outcome": "published", "version": name, "reason": why}
