"""Plots of a whole run (and of a fine-tune) as static SVG, drawn with matplotlib.

Each function returns SVG bytes whose size does not grow with the run: histograms have fixed bins,
the class chart at most `MAX_CLASSES` bars, the throughput plot one point per shard (bounded by
`MAX_POINTS`). SVGs are deterministic (fixed hash salt, no date) so two reports of one run are equal.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib import rc_context
from matplotlib.figure import Figure

from pipeline.review.overlay import palette
from pipeline.vocab import Vocabulary

MAX_CLASSES = 40  # bars in the class chart: the classes with the most pixels
MAX_POINTS = 500  # points in the throughput plot (shards beyond are thinned evenly)
_RC = {"svg.hashsalt": "clipdense", "font.size": 9}


def _svg(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with rc_context(_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def class_histogram(rows: pa.Table, vocab: Vocabulary) -> bytes:
    """Per class, its share of all labelled pixels and the number of images it appears in (ok rows)."""
    k = len(vocab)
    ids = pc.list_flatten(rows.column("class_ids")).to_numpy(zero_copy_only=False)
    counts = pc.list_flatten(rows.column("class_pixels")).to_numpy(zero_copy_only=False)
    pixels = np.bincount(ids, weights=counts, minlength=k)  # each (image, class) pair appears once per row
    images = np.bincount(ids, minlength=k)
    order = [int(c) for c in np.argsort(-pixels, kind="stable") if pixels[c] > 0]
    shown = order[:MAX_CLASSES]
    names = [vocab.display_names[c] for c in shown]
    colours = palette(k)[shown] / 255.0
    more = f" (the {len(shown)} largest of {len(order)})" if len(order) > len(shown) else ""
    with rc_context(_RC):
        fig = Figure(figsize=(9, 1.0 + 0.22 * max(1, len(names))))
        ax_pix, ax_img = fig.subplots(1, 2, sharey=True)
        y = np.arange(len(names))
        ax_pix.barh(y, 100 * pixels[shown] / max(1, pixels.sum()), color=colours, edgecolor="black", linewidth=0.4)
        ax_img.barh(y, images[shown], color=colours, edgecolor="black", linewidth=0.4)
        ax_pix.set(yticks=y, yticklabels=names, xlabel="% of labelled pixels", title=f"pixels per class{more}")
        ax_img.set(xlabel="images", title="images containing the class")
        ax_pix.invert_yaxis()
        return _svg(fig)


def confidence_distribution(rows: pa.Table) -> bytes:
    """Histograms over labelled images of their mean confidence and of their ignored fraction."""
    confidence = rows.column("mean_confidence").to_numpy(zero_copy_only=False).astype(np.float64)
    ignored = rows.column("ignored_fraction").to_numpy(zero_copy_only=False).astype(np.float64)
    bins = np.linspace(0.0, 1.0, 41)
    with rc_context(_RC):
        fig = Figure(figsize=(9, 2.6))
        ax_conf, ax_ign = fig.subplots(1, 2)
        ax_conf.hist(confidence, bins=bins, color="#3b75af")
        ax_conf.set(xlabel="mean confidence (max class probability)", ylabel="images", title="confidence per image")
        ax_ign.hist(ignored, bins=bins, color="#888888")
        ax_ign.set(xlabel="fraction of pixels ignored", ylabel="images", title="ignored pixels per image")
        return _svg(fig)


def throughput(markers: Sequence[dict[str, Any]]) -> bytes | None:
    """Samples committed over time and each shard's rate, from the commit markers' `committed_at`
    (Unix seconds), `wall_s` and sample counts. None when no marker carries a commit time."""
    timed = sorted(
        (m for m in markers if m.get("stats", {}).get("committed_at")), key=lambda m: m["stats"]["committed_at"]
    )
    if not timed:
        return None
    at = np.array([m["stats"]["committed_at"] for m in timed])
    wall = np.array([m["stats"].get("wall_s", 0.0) for m in timed])
    samples = np.array([m["samples"] for m in timed])
    start = float(np.min(at - wall))
    minutes, done = (at - start) / 60.0, np.cumsum(samples)
    rate = np.divide(samples, wall, out=np.zeros(len(timed)), where=wall > 0)
    keep = np.unique(np.linspace(0, len(timed) - 1, min(len(timed), MAX_POINTS)).round().astype(int))
    with rc_context(_RC):
        fig = Figure(figsize=(9, 2.6))
        ax_done, ax_rate = fig.subplots(1, 2)
        ax_done.step(np.append(0.0, minutes[keep]), np.append(0, done[keep]), where="post", color="#3b75af")
        ax_done.set(xlabel="minutes since the first shard started", ylabel="samples committed", title="progress")
        ax_rate.plot(minutes[keep], rate[keep], "o", markersize=3, color="#d9822b")
        ax_rate.set(xlabel="minutes (shard commit time)", ylabel="samples / s", title="per-shard throughput")
        ax_rate.set_ylim(0, 1.1 * float(rate.max()) or 1.0)
        return _svg(fig)


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], ylabel: str, title: str) -> bytes:
    """Line plot of named (steps, values) series against the training step."""
    with rc_context(_RC):
        fig = Figure(figsize=(4.5, 2.8))
        ax = fig.subplots()
        for name, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if len(series) > 1:
            ax.legend()
        return _svg(fig)
