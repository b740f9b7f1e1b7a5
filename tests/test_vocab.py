"""Vocabularies: synonyms, background, and where a run finds its class list."""

from __future__ import annotations

import json

import pytest

from pipeline.config import VocabCfg
from pipeline.vocab import Vocabulary, load_vocabulary, resolve_vocabulary


def test_json_and_text_files_with_synonyms(tmp_path):
    (tmp_path / "v.json").write_text(
        json.dumps({"classes": ["background", "tv, monitor, screen", "cat"], "background": 0})
    )
    (tmp_path / "v.txt").write_text("# my classes\ntv, monitor, screen\n\ncat\n")
    vj = load_vocabulary(str(tmp_path / "v.json"))
    vt = load_vocabulary(str(tmp_path / "v.txt"))
    assert vj.names[1] == ("tv", "monitor", "screen") and vj.background == 0
    assert vt.names == (("tv", "monitor", "screen"), ("cat",)) and vt.background is None
    assert vj.display_names == ["background", "tv", "cat"]


def test_resolution_order(tmp_path):
    (tmp_path / "vocabulary.json").write_text(json.dumps({"classes": ["background", "red circle"], "background": 0}))
    assert resolve_vocabulary(VocabCfg(classes=["cat", "dog"]), near=str(tmp_path)).display_names == ["cat", "dog"]
    assert resolve_vocabulary(VocabCfg(), near=str(tmp_path)).display_names == ["background", "red circle"]
    with pytest.raises(ValueError, match="no vocabulary: set vocab.classes"):
        resolve_vocabulary(VocabCfg(), near=str(tmp_path / "elsewhere"))
    trained = Vocabulary.from_entries(["background", "blue ring, hoop"], 0).to_json()  # a student's meta.json
    assert resolve_vocabulary(VocabCfg(), near=str(tmp_path), trained=trained).display_names[1] == "red circle"
    assert resolve_vocabulary(VocabCfg(classes=["cat", "dog"]), trained=trained).display_names == ["cat", "dog"]
    vocab = resolve_vocabulary(VocabCfg(), near=str(tmp_path / "elsewhere"), trained=trained)
    assert vocab.names == (("background",), ("blue ring", "hoop")) and vocab.background == 0
    with pytest.raises(ValueError, match="the model's meta.json vocabulary: a vocabulary JSON needs a 'classes' list"):
        resolve_vocabulary(VocabCfg(), trained={"names": ["cat"]})


def test_a_class_named_background_is_the_background_when_none_is_declared(tmp_path):
    (tmp_path / "v.txt").write_text("cat\nBackground\ndog\n")
    (tmp_path / "v.json").write_text(json.dumps({"classes": ["background", "cat"], "background": None}))
    assert resolve_vocabulary(VocabCfg(file=str(tmp_path / "v.txt"))).background == 1
    assert resolve_vocabulary(VocabCfg(file=str(tmp_path / "v.json"))).background == 0
    assert load_vocabulary(str(tmp_path / "v.json")).background == 0  # a run stored before reads the same
    assert resolve_vocabulary(VocabCfg(classes=["cat", "background"])).background == 1
    assert resolve_vocabulary(VocabCfg(classes=["cat", "dog"])).background is None
    declared = json.dumps({"classes": ["background", "sky"], "background": 1})
    (tmp_path / "d.json").write_text(declared)
    assert resolve_vocabulary(VocabCfg(file=str(tmp_path / "d.json"))).background == 1  # declared wins
    words = resolve_vocabulary(VocabCfg(classes=["cat", "background"], background=["sky"]))
    assert words.names == (("cat",), ("sky",)) and words.background == 1  # the words name that class


def test_background_words_add_or_replace_the_background_class(tmp_path):
    added = resolve_vocabulary(VocabCfg(classes=["cat"], background=["sky", "wall"]))
    assert added.names == (("sky", "wall"), ("cat",)) and added.background == 0
    (tmp_path / "vocabulary.json").write_text(json.dumps({"classes": ["cat", "background"], "background": 1}))
    replaced = resolve_vocabulary(VocabCfg(background=["floor"]), near=str(tmp_path))
    assert replaced.names == (("cat",), ("floor",)) and replaced.background == 1


def test_bad_vocabularies_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.parse_inline(" , ")
    with pytest.raises(ValueError, match="background id 3 is outside the 1 classes"):
        Vocabulary.from_entries(["cat"], background=3)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: a vocabulary JSON needs a 'classes' list"):
        load_vocabulary(str(tmp_path / "bad.json"))
