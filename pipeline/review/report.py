"""`write_report`: a static HTML report of a labeling run, or of a fine-tune and the run it learnt from.

Layout of the report folder (`OUT/review/` unless told otherwise; any fsspec URL):

    index.html                      the page (written last)
    plots/*.svg                     whole-run plots (matplotlib)
    thumbs/NNNN.<picture>.jpg       gallery thumbnails, longer side <= THUMB_PX
    full/NNNN.<picture>.jpg         the same pictures at the image's full size

with <picture> one of image, overlay, confidence, student. Its size grows with `n` (the samples
shown), never with the run: the plots have fixed bins and bar counts.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.io import fs
from pipeline.outputs import recorded_storage_options
from pipeline.review import page, plots
from pipeline.review.finetune import FineTune, is_finetune, open_finetune, student_labeler
from pipeline.review.overlay import class_shares, confidence_picture, draw_boxes, palette, thumbnail, tint, with_legend
from pipeline.review.run import RunOutput, iter_shown, open_run, parse_sort, sample_key, select

THUMB_PX = 256
JPEG_QUALITY = 90
MAX_EXAMPLES = 5  # sample keys listed per failure reason

_OWN_NAME = re.compile(r"\d{4}\.(image|overlay|confidence|student)\.jpg|[\w-]+\.svg")
Put = Callable[[str, bytes], str]  # writes a file of the report by relative name, returns the name


def write_report(
    target: str,
    out: str | None = None,
    n: int = 48,
    sort: str = "lowest-confidence",
    seed: int = 0,
    compare: int = 8,
    storage_options: dict | None = None,
    label_run: int = 1,
) -> str:
    """Write the report of the labeling run or fine-tune at `target` and return its index.html URL.

    Args:
        target: a labeling run's output, or a fine-tune's (then the gallery shows its label run number
            `label_run`, and up to `compare` of the shown images are labelled again by its student model).
        out: report folder; default `target/review`.
        n: samples in the gallery (labelled ones, chosen by `sort`).
        sort: lowest-confidence | highest-confidence | class:NAME | random (seeded by `seed`).
        compare: images of the gallery shown teacher against student (fine-tunes only).
        storage_options: fsspec options for `target`, its run, its inputs and `out`; those recorded in
            `target`'s `_run/config.yaml` fill in the keys not given.
        label_run: which of a fine-tune's label runs the gallery shows, from 1 (its `labels` order).

    Raises:
        FileNotFoundError: `target` is neither a labeling run nor a fine-tune.
        ValueError: a bad `sort` or `n`, or a `label_run` the fine-tune does not have (or other than 1
            for a labeling run).
    """
    if n < 1:
        raise ValueError(f"--n {n}: show at least one sample")
    target = target.rstrip("/")
    storage_options = recorded_storage_options(target, storage_options)
    finetune = open_finetune(target, storage_options) if is_finetune(target, storage_options) else None
    runs = finetune.labels if finetune else [target]
    if not 1 <= label_run <= len(runs):
        what = f"the fine-tune has {len(runs)} label runs" if finetune else "a labeling run is its only run"
        raise ValueError(f"--label-run {label_run}: {what} (1..{len(runs)})")
    run = open_run(runs[label_run - 1], storage_options)
    parse_sort(sort, run.vocab)  # a bad order fails before any work
    out = (out or fs.join(target, "review")).rstrip("/")
    ok = run.rows.filter(pc.equal(run.rows.column("status"), "ok"))
    indices = select(run.rows, n, sort, run.vocab, seed)

    written: set[str] = set()

    def put(name: str, data: bytes) -> str:
        fs.put_atomic(fs.join(out, name), data, storage_options)
        written.add(name)
        return name

    sections: list[tuple[str, str, str]] = [("summary", "Run", _run_section(run, ok.num_rows))]
    student = (
        student_labeler(run.url, finetune.model, run.vocab, storage_options) if _compares(finetune, compare) else None
    )
    cards = _cards(run, indices, put, student, compare)
    names = sorted({name for card in cards for name, _, _ in card.classes})
    gallery = "".join(page.card_html(card) for card in cards)
    gallery_note = f"<p>{len(cards)} of {ok.num_rows} labelled samples, {sort}. Click a picture for its full size.</p>"
    sections.append(
        ("samples", "Gallery", gallery_note + page.controls_html(names, sort) + f'<div id="gallery">{gallery}</div>')
    )
    sections.append(("plots", "The whole run", _plots(run, ok, put)))
    sections.append(("failed", "Failed samples", _failed(run)))
    if finetune:
        sections.append(("finetune", "Fine-tune", _finetune_section(finetune, label_run, cards, put)))
    sections.append(("config", "Config and summary", _config(run, finetune)))
    title = f"clipdense review: {target}"
    put("index.html", page.page(title, sections).encode())
    _remove_stale(out, written, storage_options)
    return fs.join(out, "index.html")


def _remove_stale(out: str, written: set[str], storage_options: dict | None) -> None:
    """Delete pictures and plots an earlier report left in `out` (a larger `n`, another order) that
    this one does not reference. Only names of the report's own pattern are touched."""
    for folder in ("thumbs", "full", "plots"):
        for name in fs.listdir(fs.join(out, folder), storage_options):
            if f"{folder}/{name}" not in written and _OWN_NAME.fullmatch(name):
                fs.remove(fs.join(out, folder, name), storage_options)


def _compares(finetune: FineTune | None, compare: int) -> bool:
    return finetune is not None and finetune.model is not None and compare > 0


def _jpeg(picture: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _cards(run: RunOutput, indices: list[int], put: Put, student: Any, compare: int) -> list[page.Card]:
    """Render and write the pictures of the chosen samples; cards in the chosen order."""
    # By the reader's key: a key's escaped text (`key`) can equal another key's own text.
    rank = {(row["shard"], sample_key(row)): i for i, row in enumerate(run.rows.take(indices).to_pylist())}
    cards = []
    for shown in iter_shown(run, indices):
        row, number = shown.row, rank[shown.row["shard"], sample_key(shown.row)]
        pictures = {
            "image": (shown.image, shown.image),
            "overlay": _overlay(run, shown.image, shown.labels, row["zoom_regions"] or []),
            "confidence": (confidence_picture(shown.confidence),) * 2,
        }
        learnt = student([shown.image])[0].labels if student is not None and number < compare else None
        if learnt is not None:
            pictures["student"] = _overlay(run, shown.image, learnt, [])
        thumbs = {
            k: put(f"thumbs/{number:04d}.{k}.jpg", _jpeg(thumbnail(small, THUMB_PX)))
            for k, (small, _) in pictures.items()
        }
        full = {k: put(f"full/{number:04d}.{k}.jpg", _jpeg(big)) for k, (_, big) in pictures.items()}
        card = page.Card(
            rank=number,
            key=row["key"],
            shard=row["shard"],
            width=int(row["width"]),
            height=int(row["height"]),
            mean_confidence=float(row["mean_confidence"]),
            ignored_fraction=float(row["ignored_fraction"]),
            classes=_legend(run, shown.labels),
            zoom_regions=len(row["zoom_regions"] or []),
            thumbs={k: thumbs[k] for k in ("image", "overlay", "confidence")},
            full={k: full[k] for k in ("image", "overlay", "confidence")},
        )
        if learnt is not None:
            card.student = {"thumb": thumbs["student"], "full": full["student"]}
            card.student_classes = _legend(run, learnt)
            scored = shown.labels != run.ignore  # where the teacher gave a label
            card.agreement = float((learnt[scored] == shown.labels[scored]).mean()) if scored.any() else 0.0
        cards.append(card)
    return sorted(cards, key=lambda c: c.rank)


def _legend(run: RunOutput, labels: np.ndarray) -> list[tuple[str, float, str]]:
    """(class name, share of the pixels, #rrggbb colour) of the classes in `labels`, largest first."""
    colours = palette(len(run.vocab))
    return [
        (run.vocab.display_names[c], s, "#" + bytes(colours[c].tolist()).hex())
        for c, s in class_shares(labels, run.ignore)
    ]


def _overlay(
    run: RunOutput, image: np.ndarray, labels: np.ndarray, boxes: list[list[int]]
) -> tuple[np.ndarray, Image.Image]:
    """(tinted picture with zoom boxes, the same with its legend panel): the thumbnail keeps the
    image's size (the page shows its legend), the full-size view carries its own, scaled legend."""
    entries = [
        (f"{name} {100 * share:.1f}%", bytes.fromhex(colour[1:])) for name, share, colour in _legend(run, labels)
    ]
    tinted = draw_boxes(tint(image, labels, len(run.vocab), run.ignore), boxes)
    return tinted, with_legend(tinted, entries)


def _run_section(run: RunOutput, n_ok: int) -> str:
    s = run.summary or {}
    facts = [
        ("output", run.url),
        ("committed shards", len(run.markers)),
        ("samples", run.rows.num_rows),
        ("labelled", n_ok),
        ("failed", run.rows.num_rows - n_ok),
        ("classes", len(run.vocab)),
        ("images / s (run summary)", s.get("images_per_s", "run not finished")),
        ("failed shards", len(s.get("failed_shards", []))),
    ]
    return page.table_html(facts)


def _plots(run: RunOutput, ok: pa.Table, put: Put) -> str:
    if not ok.num_rows:
        return "<p>No labelled sample yet.</p>"
    figures = [("classes", plots.class_histogram(ok, run.vocab)), ("confidence", plots.confidence_distribution(ok))]
    figures.append(("throughput", plots.throughput(run.markers)))
    return "".join(
        f'<p><img class="plot" src="{put(f"plots/{name}.svg", svg)}" alt="{name}"></p>' for name, svg in figures if svg
    )


def _failed(run: RunOutput) -> str:
    """Failed samples grouped by reason (count, a few keys), then shards that failed as a whole."""
    failed = (
        run.rows.filter(pc.equal(run.rows.column("status"), "failed")).select(["shard", "key", "error"]).to_pylist()
    )
    counts = Counter(r["error"] for r in failed)
    examples: dict[str, list[str]] = defaultdict(list)
    for r in failed:
        if len(examples[r["error"]]) < MAX_EXAMPLES:
            examples[r["error"]].append(f"{r['shard']}/{r['key']}")
    html = f"<p>{len(failed)} failed samples in committed shards.</p>"
    if failed:
        rows = [(count, reason, ", ".join(examples[reason])) for reason, count in counts.most_common()]
        html += page.table_html(rows, ("samples", "reason", f"examples (up to {MAX_EXAMPLES})"))
    shards = (run.summary or {}).get("failed_shards", [])
    if shards:
        html += "<p>Shards that failed as a whole:</p>"
        html += page.table_html(
            [(s["shard"], s.get("attempts"), s.get("error")) for s in shards], ("shard", "attempts", "reason")
        )
    return html


def _finetune_section(finetune: FineTune, label_run: int, cards: list[page.Card], put: Put) -> str:
    html = f"<p>Fine-tune {finetune.url} on {', '.join(finetune.labels)}.</p>"
    if len(finetune.labels) > 1:
        html += (
            f"<p>The gallery shows label run {label_run} of {len(finetune.labels)} "
            f"({escape(finetune.labels[label_run - 1])}); <code>clipdense review {escape(finetune.url)} "
            "--label-run N</code> shows run N.</p>"
        )
    for name, (kind, value, label) in {
        "loss": ("train", "loss", "training loss"),
        "miou": ("eval", "mIoU", "mIoU"),
    }.items():
        steps, values = finetune.series(kind, value)
        if steps:
            svg = plots.curves({label: (steps, values)}, label, f"{label} by step")
            html += f'<img class="plot" src="{put(f"plots/finetune-{name}.svg", svg)}" alt="{label}">'
    pairs = [c for c in cards if c.student]
    if pairs:
        html += f"<h3>Teacher against student on {len(pairs)} images</h3>"
        html += '<div class="pairs">' + "".join(page.pair_html(c) for c in pairs) + "</div>"
    elif finetune.model is None:
        html += "<p>No exported student model yet (model/ is missing).</p>"
    return html


def _config(run: RunOutput, finetune: FineTune | None) -> str:
    summary = json.dumps(run.summary, indent=2) if run.summary else "(the run has not finished: no summary)"
    html = f"<h3>Labeling run config</h3><pre>{escape(run.config_text)}</pre><h3>Labeling run summary</h3><pre>{escape(summary)}</pre>"
    if finetune:
        ft_summary = json.dumps(finetune.summary, indent=2) if finetune.summary else "(not finished)"
        html += f"<h3>Fine-tune config</h3><pre>{escape(finetune.config_text)}</pre>"
        html += f"<h3>Fine-tune summary</h3><pre>{escape(ft_summary)}</pre>"
    return html
