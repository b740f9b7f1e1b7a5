"""A fine-tune's output as the review report reads it: its curves, its label runs, its student model.

Layout (the fine-tune job's contract): `OUT/metrics.jsonl` (training lines `{"kind": "train",
"step", "loss", ...}` and evaluation lines `{"kind": "eval", "step", "mIoU", ...}`),
`OUT/_run/config.yaml` (`labels: [RUN, ...]`, `output`), `OUT/_run/summary.json` (written last),
`OUT/model/` (the exported student, a model folder the engine loads as `model.name`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import schema
from pipeline.io import fs
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


@dataclass
class FineTune:
    """What the report shows of a fine-tune at `url`."""

    url: str
    metrics: list[dict[str, Any]]  # metrics.jsonl lines, in file order
    labels: list[str]  # the label runs it trained on
    config_text: str
    summary: dict[str, Any] | None  # None while it has not finished
    model: str | None  # OUT/model when exported

    def series(self, kind: str, value: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `value` over the `kind` lines that carry it (e.g. "train", "loss")."""
        lines = [m for m in self.metrics if m.get("kind") == kind and m.get(value) is not None and "step" in m]
        return [float(m["step"]) for m in lines], [float(m[value]) for m in lines]


def is_finetune(url: str, storage_options: dict | None = None) -> bool:
    """True when `url` holds a fine-tune's output (its metrics file) rather than a labeling run."""
    return fs.exists(fs.join(url, METRICS_FILE), storage_options)


def open_finetune(url: str, storage_options: dict | None = None) -> FineTune:
    """Read a fine-tune's metrics, config, summary and model location. Unparseable metric lines are
    skipped with a warning (a fine-tune still running may be mid-way through writing one).

    Raises:
        ValueError: its config names no label run.
    """
    url = url.rstrip("/")
    metrics = []
    for number, line in enumerate(fs.read_text(fs.join(url, METRICS_FILE), storage_options).splitlines(), 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; skipped", METRICS_FILE, number)
    config_url, summary_url = fs.join(url, schema.CONFIG_FILE), fs.join(url, schema.SUMMARY_FILE)
    config_text = fs.read_text(config_url, storage_options) if fs.exists(config_url, storage_options) else ""
    summary = fs.read_json(summary_url, storage_options) if fs.exists(summary_url, storage_options) else None
    labels = (summary or {}).get("labels") or (yaml.safe_load(config_text) or {}).get("labels") or []
    if not labels:
        raise ValueError(f"{url}: the fine-tune names no label run ({schema.CONFIG_FILE} has no labels)")
    model = fs.join(url, MODEL_DIR)
    has_model = fs.exists(fs.join(model, "config.json"), storage_options)
    return FineTune(url, metrics, [str(x) for x in labels], config_text, summary, model if has_model else None)


def student_labeler(teacher_run: str, model: str, vocab: Vocabulary, storage_options: dict | None = None) -> Any:
    """The engine's labeler for the student `model` folder, labelling as `clipdense label
    model.name=MODEL` does: every key at its default, so the model's `meta.json` supplies its head,
    prompts, logit scale and recommended passes, except the teacher run's resolution (`infer.short_side`,
    `crop`, `stride`, `batch_size`) and device, so both label the same pixels.

    Returns a `DenseLabeler` (callable on a list of (H, W, 3) uint8 images). Imports torch.
    """
    from pipeline.config import InferCfg, ModelCfg, RunCfg
    from pipeline.outputs import read_run_config
    from pipeline.stages.infer import DenseLabeler

    teacher = read_run_config(teacher_run, storage_options)
    t = teacher.infer
    cfg = RunCfg(
        model=ModelCfg(name=model, precision=teacher.model.precision, device=teacher.model.device),
        infer=InferCfg(short_side=t.short_side, crop=t.crop, stride=t.stride, batch_size=t.batch_size),
        storage_options={**teacher.storage_options, **(storage_options or {})},
    )
    return DenseLabeler(cfg, vocab, cfg.storage_options)
