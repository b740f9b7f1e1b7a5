"""Class vocabularies: which ids a label map uses, and the words that name each class.

A vocabulary file is JSON (`vocabulary.json`, the format ShapeWorld writes and a labeling run copies
to `_run/vocabulary.json`) or plain text with one class per line. In both, one class may carry
synonyms separated by commas ("tv, monitor, screen": the class scores the max over its names).

JSON form::

    {"classes": ["background", "red circle", "tv, monitor"], "background": 0}

`background` (optional) is the id of the background class, which a head may score from its own
words, from a probability threshold, or both. A class list that declares none (plain text, inline
`vocab.classes`, JSON without the key) takes the class named "background", if it has one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import VocabCfg
from pipeline.io import fs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Vocabulary:
    names: tuple[tuple[str, ...], ...]  # per class id, its names (first = display name)
    background: int | None = None  # id of the background class, if any

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("the vocabulary is empty: give at least one class")
        for i, names in enumerate(self.names):
            if not names or not all(n.strip() for n in names):
                raise ValueError(f"class {i} of the vocabulary has an empty name")
        if self.background is not None and not 0 <= self.background < len(self.names):
            raise ValueError(f"background id {self.background} is outside the {len(self.names)} classes")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def display_names(self) -> list[str]:
        return [names[0] for names in self.names]

    @classmethod
    def from_entries(cls, entries: list[str], background: int | None = None) -> Vocabulary:
        """One class per entry (synonyms split at commas). Without a `background` id, the class named
        "background" (any case), if any, is the background class: every class list, from a file,
        inline or stored by an earlier run, follows this one rule."""
        names = tuple(_split_synonyms(e) for e in entries)
        if background is None:
            display = [n[0].lower() if n else "" for n in names]
            background = display.index("background") if "background" in display else None
        return cls(names, background)

    @classmethod
    def parse_inline(cls, text: str) -> Vocabulary:
        """`"cat, dog, grass"` from a command line: one class per comma, no synonyms."""
        return cls.from_entries([c for c in (p.strip() for p in text.split(",")) if c])

    @classmethod
    def from_json(cls, data: Any, source: str) -> Vocabulary:
        """The vocabulary `to_json` wrote (`source` names where it came from, for the error).

        Raises:
            ValueError: `data` is not a dict with a 'classes' list.
        """
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise ValueError(f"{source}: a vocabulary JSON needs a 'classes' list")
        return cls.from_entries([str(c) for c in data["classes"]], data.get("background"))

    def to_json(self) -> dict:
        return {"classes": [", ".join(n) for n in self.names], "background": self.background}


def _split_synonyms(entry: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in entry.split(",") if n.strip())


def _word(name: str) -> str:
    """`name` as two spellings of one word compare: lower case, single spaces."""
    return " ".join(name.lower().split())


def _check_entries(vocab: Vocabulary) -> None:
    """Refuse a class listed twice; warn about a word that names two different classes.

    A class listed twice can never win a pixel (the first copy takes every tie). A word shared by two
    classes is common in real vocabularies (ADE20K's full names) and harmless: each class scores it.
    """
    classes: dict[frozenset[str], int] = {}
    owner: dict[str, int] = {}
    for i, names in enumerate(vocab.names):
        words = [_word(n) for n in names]
        first = classes.setdefault(frozenset(words), i)
        if first != i:
            raise ValueError(
                f"the vocabulary lists one class twice: class {first} ({', '.join(vocab.names[first])!r}) and "
                f"class {i} ({', '.join(names)!r}); drop one"
            )
        for name, word in zip(names, words, strict=True):
            other = owner.setdefault(word, i)
            if other != i:
                logger.warning(
                    "the vocabulary names %r in class %d (%r) and in class %d (%r): both classes score it",
                    name,
                    other,
                    ", ".join(vocab.names[other]),
                    i,
                    ", ".join(names),
                )


def load_vocabulary(url: str, storage_options: dict | None = None) -> Vocabulary:
    """Read a vocabulary file (JSON as above, or one class per line, `#` comments allowed)."""
    text = fs.read_text(url, storage_options)
    if url.endswith(".json"):
        import json

        return Vocabulary.from_json(json.loads(text), url)
    lines = [line.strip() for line in text.splitlines()]
    return Vocabulary.from_entries([line for line in lines if line and not line.startswith("#")])


def resolve_vocabulary(
    cfg: VocabCfg, near: str | None = None, storage_options: dict | None = None, trained: dict | None = None
) -> Vocabulary:
    """The run's vocabulary: inline classes, else `cfg.file`, else `vocabulary.json` beside the input,
    else `trained` (a model folder's meta.json `vocabulary`: the classes a fine-tuned student learnt).

    What the user chose is checked here, not in `Vocabulary` (stored files must load as they were
    written): a class listed twice and a one-class vocabulary without background words are refused.
    """
    if cfg.classes:
        vocab = Vocabulary.from_entries(list(cfg.classes))
    elif cfg.file:
        vocab = load_vocabulary(cfg.file, storage_options)
    elif near and fs.exists(fs.join(near, "vocabulary.json"), storage_options):
        vocab = load_vocabulary(fs.join(near, "vocabulary.json"), storage_options)
    elif trained:
        vocab = Vocabulary.from_json(trained, "the model's meta.json vocabulary")
    else:
        raise ValueError(
            "no vocabulary: set vocab.classes (inline) or vocab.file, or put a vocabulary.json beside the input shards"
        )
    if cfg.background:
        # An explicit background word list becomes (or replaces the words of) the background class.
        names = list(vocab.names)
        if vocab.background is None:
            vocab = Vocabulary(tuple([tuple(cfg.background), *names]), 0)
        else:
            names[vocab.background] = tuple(cfg.background)
            vocab = Vocabulary(tuple(names), vocab.background)
    _check_entries(vocab)
    if len(vocab) < 2:
        # A softmax over one class gives it every pixel at probability 1.0: a silent, useless run.
        (names,) = vocab.names
        listed = ", ".join(names)
        fixes = [f"for {len(names)} classes write vocab.classes='[{listed}]'"] if len(names) > 1 else []
        fixes.append(f"to find {names[0]!r} against everything else add words: vocab.background='[sky, wall, floor]'")
        raise ValueError(
            f"the vocabulary has one class ({listed!r}), so every pixel would get it with confidence 1.0: "
            + "; or ".join(fixes)
        )
    return vocab
