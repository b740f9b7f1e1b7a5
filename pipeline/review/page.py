"""The review report's HTML: one static page, no server, no network, no JavaScript library.

The page's only script sorts and filters the gallery's cards in place from their `data-*`
attributes (mean confidence, ignored fraction, classes and their shares), so it works from a file
opened on disk. Every text taken from the run is escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
#controls { position: sticky; top: 0; background: #fff; padding: .5em 0; z-index: 1; }
#gallery, .pairs { display: flex; flex-wrap: wrap; gap: 1em; }
.card, .pair { border: 1px solid #ccc; border-radius: 6px; padding: .5em; width: fit-content; max-width: 100%; }
.card[hidden] { display: none; }
.pics { display: flex; gap: 4px; align-items: flex-start; }
.pics figure { margin: 0; text-align: center; font-size: 80%; }
.pics img { width: 256px; height: auto; image-rendering: auto; background: #eee; }
.legend { list-style: none; padding: 0; margin: .3em 0; display: flex; flex-wrap: wrap; gap: .2em .8em; }
.swatch { display: inline-block; width: .9em; height: .9em; border: 1px solid #000; vertical-align: middle; }
.figures { font-size: 85%; color: #444; }
.plot { max-width: 100%; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .5em; text-align: left; }
pre { background: #f6f6f6; padding: .6em; overflow: auto; max-height: 30em; }
"""

SCRIPT = """
const gallery = document.getElementById('gallery');
const cards = Array.from(gallery.querySelectorAll('.card'));
const sortBy = document.getElementById('sort'), onlyClass = document.getElementById('class');
const minConf = document.getElementById('min-confidence'), maxConf = document.getElementById('max-confidence');
function share(card, name) { return JSON.parse(card.dataset.shares)[name] || 0; }
const keys = {
  shown: c => +c.dataset.rank,
  'lowest-confidence': c => +c.dataset.confidence,
  'highest-confidence': c => -c.dataset.confidence,
  'most-ignored': c => -c.dataset.ignored,
  'class-share': c => -share(c, onlyClass.value),
};
function apply() {
  const key = keys[sortBy.value];
  cards.sort((a, b) => key(a) - key(b) || a.dataset.rank - b.dataset.rank);
  let shown = 0;
  for (const card of cards) {
    const conf = +card.dataset.confidence;
    card.hidden = (onlyClass.value !== '' && share(card, onlyClass.value) === 0)
      || conf < +minConf.value || conf > +maxConf.value;
    shown += !card.hidden;
    gallery.appendChild(card);
  }
  document.getElementById('shown').textContent = shown;
}
for (const el of [sortBy, onlyClass, minConf, maxConf]) el.addEventListener('input', apply);
apply();
"""


@dataclass
class Card:
    """One gallery sample: its figures and the report-relative paths of its pictures."""

    rank: int  # position in the report's chosen order
    key: str
    shard: str
    width: int
    height: int
    mean_confidence: float
    ignored_fraction: float
    classes: list[tuple[str, float, str]]  # (name, share of pixels, #rrggbb), largest first
    zoom_regions: int
    thumbs: dict[str, str]  # image | overlay | confidence -> thumbnail path
    full: dict[str, str]  # the same pictures at full size
    student: dict[str, str] = field(default_factory=dict)  # thumb / full student overlay, when compared
    student_classes: list[tuple[str, float, str]] = field(default_factory=list)  # as `classes`, the student's
    agreement: float = 0.0  # fraction of the teacher's labelled pixels where the student agrees


def _figure(thumb: str, full: str, caption: str) -> str:
    return (
        f'<figure><a href="{escape(full)}"><img src="{escape(thumb)}" alt="{escape(caption)}" '
        f'data-full="{escape(full)}"></a><figcaption>{escape(caption)}</figcaption></figure>'
    )


def _legend(classes: list[tuple[str, float, str]]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{c}"></span> {escape(n)} {100 * s:.1f}%</li>'
        for n, s, c in classes
    )
    return f'<ul class="legend">{items}</ul>'


def card_html(card: Card) -> str:
    """A gallery card: three linked thumbnails, the legend, the figures; `data-*` for the script."""
    shares = json.dumps({n: round(s, 6) for n, s, _ in card.classes})
    pics = "".join(_figure(card.thumbs[k], card.full[k], k) for k in ("image", "overlay", "confidence"))
    return (
        f'<article class="card" data-rank="{card.rank}" data-key="{escape(card.key)}" '
        f'data-confidence="{card.mean_confidence:.6f}" data-ignored="{card.ignored_fraction:.6f}" '
        f'data-shares="{escape(shares)}">'
        f'<div class="pics">{pics}</div>{_legend(card.classes)}'
        f'<div class="figures"><b>{escape(card.key)}</b> · shard {escape(card.shard)} · {card.width}×{card.height} · '
        f"mean confidence {card.mean_confidence:.3f} · ignored {100 * card.ignored_fraction:.1f}% · "
        f"{len(card.classes)} classes · {card.zoom_regions} zoom regions (boxes)</div></article>"
    )


def pair_html(card: Card) -> str:
    """Teacher (the run's pseudo-labels) beside the student's labels on one image."""
    pics = _figure(card.thumbs["image"], card.full["image"], "image")
    pics += _figure(card.thumbs["overlay"], card.full["overlay"], "teacher")
    pics += _figure(card.student["thumb"], card.student["full"], "student")
    return (
        f'<article class="pair" data-key="{escape(card.key)}" data-agreement="{card.agreement:.6f}">'
        f'<div class="pics">{pics}</div>teacher {_legend(card.classes)}student {_legend(card.student_classes)}'
        f'<div class="figures"><b>{escape(card.key)}</b> · the student agrees on {100 * card.agreement:.1f}% '
        "of the teacher's labelled pixels</div></article>"
    )


def controls_html(class_names: list[str], sort: str) -> str:
    """The gallery's sort and filter controls (`class_names`: the classes of the shown cards)."""
    selected = {"lowest-confidence": "lowest-confidence", "highest-confidence": "highest-confidence"}.get(sort, "shown")
    options = [
        ("shown", f"as chosen ({sort})"),
        ("lowest-confidence", "lowest confidence first"),
        ("highest-confidence", "highest confidence first"),
        ("most-ignored", "most ignored pixels first"),
        ("class-share", "largest share of the class below first"),
    ]
    sorts = "".join(f'<option value="{v}"{" selected" * (v == selected)}>{escape(t)}</option>' for v, t in options)
    classes = "".join(f'<option value="{escape(n)}">{escape(n)}</option>' for n in class_names)
    return (
        f'<div id="controls">sort <select id="sort">{sorts}</select> · class <select id="class">'
        f'<option value="">any</option>{classes}</select> · mean confidence from '
        '<input id="min-confidence" type="number" min="0" max="1" step="0.05" value="0"> to '
        '<input id="max-confidence" type="number" min="0" max="1" step="0.05" value="1"> · '
        '<span id="shown"></span> shown</div>'
    )


def table_html(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ()) -> str:
    """An HTML table of `rows` (values shown with str, escaped) under an optional `header`."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: `sections` are (id, heading, inner HTML); the script runs last."""
    body = "".join(f'<section id="{sid}"><h2>{escape(h)}</h2>{inner}</section>' for sid, h, inner in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}<script>{SCRIPT}</script></body></html>"
    )
