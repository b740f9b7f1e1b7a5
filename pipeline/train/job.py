"""The fine-tuning job: pseudo-label shards in, a DenseCLIP student out (MaskCLIP+'s self-training step
with DenseCLIP's model and recipe; see `pipeline.models.student` and METHODS.md 1.2-1.3).

`finetune(cfg)` checks the config, resolves the model (the labeling run's own CLIP unless the config
names one), checks `OUT` (an existing output with an equal config is resumed from its latest
checkpoint and ends at the same final step; a finished one returns its summary; a different config is
refused, naming the keys), then trains in this process
(`distribute.num_workers: 0`) or on Ray Train with N workers (`pipeline.distribute.train`); both run
`train_worker` with the label set `finetune` read once (`runs.read_label_set`: refusals happen
before any worker starts); it records `_run/config.yaml` once its model is built, so that a run
stopped by a bad value leaves nothing that refuses the corrected run. A caller may pass
`stop`, asked before each checkpoint, metrics line, evaluation and export (see `finetune`). Output
layout: `_run/config.yaml`, `checkpoints/`, `metrics.jsonl` (train and eval lines), `model/` (the
exported student), `_run/summary.json` (written last).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import yaml

from pipeline import schema
from pipeline.config import diff_keys, dump_yaml, from_dict
from pipeline.io import fs
from pipeline.models.backbone import model_config, model_meta
from pipeline.models.precision import resolve_device, resolve_dtype
from pipeline.outputs import public_config
from pipeline.train import checkpoint
from pipeline.train.config import EXECUTION_KEYS, FinetuneCfg, canonical_finetune_config, check, finetune_hash
from pipeline.train.data import LabelStream
from pipeline.train.evaluate import evaluate_folder
from pipeline.train.export import export
from pipeline.train.loop import TRIM_EVERY, MasterCopy, Progress, attention_kernel, release_freed_memory, warmup_poly
from pipeline.train.runs import LabelSet, open_runs, read_label_set
from pipeline.train.student import build, continues_student, loss, teacher_model, trainable_groups

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


class OutputConflict(ValueError):
    """The output holds a fine-tune with a different config."""


class Stopped(RuntimeError):
    """The caller's `stop` asked the fine-tune to end; it wrote nothing more to its output after the answer."""


Stop = Callable[[], bool]


def finetune(cfg: FinetuneCfg, stop: Stop | None = None) -> dict[str, Any]:
    """Run (or resume) the fine-tune of `cfg`; returns the run summary (module docstring). Local paths in
    `cfg` are made absolute first, from the current folder (`canonical_finetune_config`).

    `stop`, when given, is asked at every progress line, checkpoint and evaluation and before the
    summary; once it answers True the run raises `Stopped` and writes nothing more, so that its output
    can be resumed by someone else (a retraining step whose lease was taken: the folder is the new
    holder's). With Ray Train workers rank 0 asks it and tells the others; it must then pickle.
    """
    check(cfg)
    cfg = canonical_finetune_config(cfg)
    so = cfg.storage_options or None
    runs = open_runs(cfg.labels, so)
    cfg = dataclasses.replace(cfg, model=teacher_model(runs[0].config.model, cfg.model))
    summary_url = fs.join(cfg.output, schema.SUMMARY_FILE)
    _check_output(cfg)
    if fs.exists(summary_url, so):
        logger.info("%s is finished: returning its summary", cfg.output)
        return fs.read_json(summary_url, so)
    if continues_student(cfg, model_meta(cfg.model.name, so)):  # refused options fail here, not in a worker
        logger.info("the student's own parts start from %s's (warm_start)", cfg.model.name)
    label_set = read_label_set(runs, so, cfg.data.combine)  # read once: workers get it; unusable shards fail here
    if cfg.distribute.num_workers > len(label_set.usable):
        raise ValueError(
            f"distribute.num_workers={cfg.distribute.num_workers}, but only {len(label_set.usable)} label shards "
            "have labelled samples: each worker reads shards of its own, so use at most that many workers"
        )
    if cfg.distribute.num_workers > 0:
        from pipeline.distribute.train import run_train_workers  # Ray stays out of in-process runs

        try:
            run_train_workers(cfg, functools.partial(train_worker, stop=stop, label_set=label_set))
        except Exception:  # Ray Train reports a worker's Stopped as its own error type
            if stop is not None and stop():
                raise Stopped(f"{cfg.output}: the fine-tune was asked to stop") from None
            raise
        return fs.read_json(summary_url, so)
    return train_worker(cfg, stop=stop, label_set=label_set)


def _check_output(cfg: FinetuneCfg) -> None:
    """OutputConflict when `cfg.output` records a fine-tune whose config differs from `cfg`."""
    so = cfg.storage_options or None
    url = fs.join(cfg.output, schema.CONFIG_FILE)
    if not fs.exists(url, so):
        return
    previous = from_dict(FinetuneCfg, yaml.safe_load(fs.read_text(url, so)) or {}, schema.CONFIG_FILE)
    # Outputs recorded before local paths were made absolute may hold relative ones: read from the current
    # folder like `cfg`'s, so a run resumed from where it was started is still the same run.
    previous = canonical_finetune_config(previous)
    if finetune_hash(previous) != finetune_hash(cfg):
        keys = [k for k in diff_keys(previous, cfg) if k.split(".")[0] not in EXECUTION_KEYS]
        raise OutputConflict(
            f"{cfg.output} holds a fine-tune with a different config (differing keys: {', '.join(keys)}); "
            "choose a new output"
        )


def _record_config(cfg: FinetuneCfg) -> None:
    so = cfg.storage_options or None
    url = fs.join(cfg.output, schema.CONFIG_FILE)
    if not fs.exists(url, so):
        fs.put_atomic(url, dump_yaml(public_config(cfg)).encode(), so)


def train_worker(
    cfg: FinetuneCfg, rank: int = 0, world: int = 1, stop: Stop | None = None, *, label_set: LabelSet
) -> dict[str, Any]:
    """Train on this worker's share of the label shards of `label_set` (`read_label_set`, read once for
    every worker); rank 0 writes checkpoints, metrics, the model and the summary. With `world` > 1 the
    default torch.distributed process group must be initialised. `stop`: see `finetune` (Stopped)."""
    so = cfg.storage_options or None
    runs = label_set.runs
    vocab = runs[0].vocab
    model, backbone = build(cfg)
    if rank == 0:
        _record_config(cfg)
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.precision, device)
    model.to(device)
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.optim.weight_decay, cfg.optim.backbone_lr_mult), lr=cfg.optim.lr
    )
    state = checkpoint.load_latest(cfg.output, so)
    start, train_seconds, metrics = 0, 0.0, []
    _set_rng(_seeded_rng(cfg.seed + rank))  # dropout draws: a run repeats, a resumed one continues them
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng(state["rng"])
        start, train_seconds = int(state["step"]), float(state["train_seconds"])
        metrics = [m for m in _read_metrics(cfg) if m["step"] <= start]
        logger.info("resuming %s from step %d", cfg.output, start)
    steps = cfg.optim.steps
    master = MasterCopy(model, dtype)
    net = master.work
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    tokens = model.text.tokenize([n for names in vocab.names for n in names]).to(device)
    class_index = torch.tensor([c for c, names in enumerate(vocab.names) for _ in names], device=device)
    ignore = schema.ignore_value(len(vocab))
    crop = cfg.data.crop or backbone.image_size[0]
    batch = cfg.optim.batch_size // world
    stream = LabelStream(runs, label_set.usable, cfg.data, batch, crop, ignore, cfg.seed, rank, world, start, so)
    workers = cfg.data.loader_workers
    # The loader's own generator: starting an iterator draws a seed, which must not move the dropout RNG.
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    progress = Progress(steps, start)
    counts: dict[int, dict] = {}
    lr = 0.0
    batches = iter(loader)
    for step in range(start, steps):
        data = next(batches)
        counts[step % max(1, workers)] = {**data["skipped"], "used": data["used"]}
        images = ((data["image"].to(device).float() / 255) - mean) / std
        with attention_kernel(device):
            scores, aux = net(images.to(dtype), tokens, class_index, len(vocab))
            value = loss(
                scores, aux, master.work.logit_scale, data["labels"].to(device), data["conf"].to(device),
                cfg.data, cfg.optim.aux_weight, cfg.student.tau, ignore,
            )  # fmt: skip
            master.work.zero_grad(set_to_none=True)
            value.backward()
        o = cfg.optim
        lr = warmup_poly(step, steps, o.lr, o.warmup, o.power, o.min_lr)
        master.step(optimizer, [lr] * len(optimizer.param_groups), o.grad_clip)
        if (step + 1) % TRIM_EVERY == 0:
            release_freed_memory()
        progress.add(value.item(), len(images) * world)
        done = step + 1
        log = done % cfg.log_every == 0 or done == steps
        save = done % cfg.checkpoint_every == 0 or done == steps
        evaluate = bool(cfg.eval.truth) and cfg.eval.every > 0 and done % cfg.eval.every == 0 and done < steps
        if log or save or evaluate:
            _stop_if_asked(stop, cfg.output, f"at step {done}", rank, world, device)
        if log:
            metrics.append({"kind": "train", **progress.record(done, lr)})
        with progress.pause():
            if save and rank == 0:
                seconds = train_seconds + progress.train_seconds
                checkpoint.save(cfg.output, done, _state(model, optimizer, done, seconds), so)
                _write_metrics(cfg, metrics)
            if evaluate:  # rank 0 evaluates, which takes a while: then every rank hears whether to stop
                if rank == 0:
                    metrics.append(_evaluate(cfg, model, backbone, vocab, done))
                _stop_if_asked(stop, cfg.output, f"after the evaluation at step {done}", rank, world, device)
                if rank == 0:
                    _write_metrics(cfg, metrics)
    train_seconds += progress.train_seconds
    skipped = _gather_counts(counts, world)
    if rank != 0:
        return {}
    return _finish(cfg, model, backbone, vocab, label_set, skipped, metrics, train_seconds, stop)


def _stop_if_asked(
    stop: Stop | None, output: str, when: str, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> None:
    """Stopped once `stop` answers True. Rank 0 asks; with `world` > 1 a broadcast gives every rank its
    answer, so all leave at one step (every rank must then call this at the same steps)."""
    if stop is None:
        return
    asked = bool(stop()) if rank == 0 else False
    if world > 1:
        flag = torch.tensor([int(asked)], device=device)
        torch.distributed.broadcast(flag, src=0)
        asked = bool(flag.item())
    if asked:
        raise Stopped(f"{output}: asked to stop {when}; its last checkpoint is the one to resume")


def _finish(cfg, model, backbone, vocab, label_set: LabelSet, skipped, metrics, train_seconds, stop) -> dict:
    so = cfg.storage_options or None
    final = None
    _stop_if_asked(stop, cfg.output, "after its final checkpoint")
    if cfg.eval.truth:
        line = _evaluate(cfg, model, backbone, vocab, cfg.optim.steps)
        metrics.append(line)
        final = line["mIoU"]
    else:
        _export(cfg, model, backbone, vocab)
    _stop_if_asked(stop, cfg.output, "after its final evaluation")
    _write_metrics(cfg, metrics)
    used = skipped.pop("used", 0)
    summary = {
        "final_step": cfg.optim.steps,
        "mIoU": final,
        "skipped": {**label_set.skipped, **skipped},
        "train_seconds": round(train_seconds, 1),
        "n_samples": sum(u.ok for u in label_set.units),
        "samples_read_first_pass": used,
        "failed_rows": sum(u.samples - u.ok for u in label_set.units),
        "label_shards": len(label_set.units),
        "labels": [r.output for r in label_set.runs],
        "labelled_by": list(label_set.labelled_by),
        # the first run that adds samples: a run without any is left out of the fine-tune
        "teacher": {k: v for k, v in label_set.labelled_by[label_set.usable[0].runs[0]].items() if k != "labels"},
        "model": fs.join(cfg.output, MODEL_DIR),
    }
    fs.put_json(fs.join(cfg.output, schema.SUMMARY_FILE), summary, so)
    return summary


def _export(cfg: FinetuneCfg, model, backbone, vocab) -> str:
    extra = {"trained": {"labels": list(cfg.labels), "steps": cfg.optim.steps, "config_hash": finetune_hash(cfg)}}
    config = model_config(cfg.model.name, cfg.storage_options or None)
    folder = fs.join(cfg.output, MODEL_DIR)
    return export(model, folder, config, backbone, vocab, extra, cfg.storage_options or None)


def _evaluate(cfg: FinetuneCfg, model, backbone, vocab, step: int) -> dict:
    """Export the current weights, then score that folder exactly as `clipdense eval` would."""
    folder = _export(cfg, model, backbone, vocab)
    report = evaluate_folder(folder, cfg.eval.truth, cfg.model, cfg.storage_options or None)
    line = {"kind": "eval", "step": step, "mIoU": report["mIoU"], "n_images": report["n_images"],
            "small_object_iou": report.get("small_object_iou"), "background_iou": report.get("background_iou")}  # fmt: skip
    logger.info("step %d eval mIoU %.4f on %d images", step, report["mIoU"], report["n_images"])
    return line


def _state(model, optimizer, step: int, train_seconds: float) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data": {"batches": step},  # the stream is a function of (seed, worker, batch index)
        "train_seconds": train_seconds,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }


def _seeded_rng(seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
    return {"torch": state, "numpy": np.random.RandomState(seed).get_state(), "python": random.Random(seed).getstate()}


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def _gather_counts(counts: dict[int, dict], world: int) -> dict[str, int]:
    total: dict[str, int] = {}
    parts = list(counts.values())
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, parts)
        parts = [p for worker in gathered for p in worker]
    for part in parts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + int(n)
    return total


def _read_metrics(cfg: FinetuneCfg) -> list[dict]:
    url = fs.join(cfg.output, METRICS_FILE)
    if not fs.exists(url, cfg.storage_options or None):
        return []
    return [json.loads(line) for line in fs.read_text(url, cfg.storage_options or None).splitlines() if line]


def _write_metrics(cfg: FinetuneCfg, metrics: list[dict]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    fs.put_atomic(fs.join(cfg.output, METRICS_FILE), text.encode(), cfg.storage_options or None)
