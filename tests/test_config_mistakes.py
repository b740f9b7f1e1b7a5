"""Config and output mistakes users make: a string for a list, one class, a class listed twice, the same
run spelled two ways, a commit that fails half-way."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline import schema
from pipeline.config import ConfigError, load_config
from pipeline.io import fs
from pipeline.outputs import (
    OutputConflict,
    canonical_config,
    prepare_output,
    read_run_config,
    remove_temporaries,
    write_vocabulary,
)
from pipeline.stages.write import LabelShardSink, RowContext
from pipeline.vocab import Vocabulary, load_vocabulary, resolve_vocabulary


def test_a_string_where_a_list_is_expected_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["vocab.classes=red circle, blue square, grey background"])
    assert str(err.value) == (
        "vocab.classes: got the string 'red circle, blue square, grey background', expected a list. For 3 entries "
        "write vocab.classes='[red circle, blue square, grey background]' (in YAML: classes: [red circle, blue "
        "square, grey background]); for one entry whose names are synonyms, "
        "vocab.classes='[\"red circle, blue square, grey background\"]'"
    )
    with pytest.raises(ConfigError, match=r"vocab.background: got the string 'sky', expected a list: write "):
        load_config(None, ["vocab.background=sky"])
    fixed = load_config(None, ["vocab.classes=[red circle, blue square, grey background]"])
    assert resolve_vocabulary(fixed.vocab).names == (("red circle",), ("blue square",), ("grey background",))


def test_a_string_input_is_still_one_spec():
    assert load_config(None, ["input=s3://bkt/{a,b}.tar"]).input == ["s3://bkt/{a,b}.tar"]


def test_a_one_class_vocabulary_is_refused_unless_it_has_a_background():
    one = load_config(None, ['vocab.classes=["red circle, blue square, grey background"]'])
    with pytest.raises(ValueError) as err:
        resolve_vocabulary(one.vocab)
    assert "has one class ('red circle, blue square, grey background')" in str(err.value)
    assert "for 3 classes write vocab.classes='[red circle, blue square, grey background]'" in str(err.value)
    with pytest.raises(ValueError, match=r"add words: vocab.background="):
        resolve_vocabulary(load_config(None, ["vocab.classes=[cat]"]).vocab)
    with_background = resolve_vocabulary(load_config(None, ["vocab.classes=[cat]", "vocab.background=[sky]"]).vocab)
    assert (with_background.names, with_background.background) == ((("sky",), ("cat",)), 0)


@pytest.mark.parametrize(
    ("entries", "first", "second"),
    [
        (["cat", "dog", "Cat"], "'cat'", "'Cat'"),
        (["a b", "a  b"], "'a b'", "'a  b'"),
        (["tv, monitor", "monitor, TV"], "'tv, monitor'", "'monitor, TV'"),
    ],
)
def test_a_class_listed_twice_is_refused(entries, first, second):
    with pytest.raises(
        ValueError,
        match=rf"lists one class twice: class 0 \({first}\) and class {len(entries) - 1} \({second}\); drop one",
    ):
        resolve_vocabulary(load_config(None, [f"vocab.classes={entries}"]).vocab)


def test_a_word_shared_by_two_classes_is_a_warning(caplog):
    vocab = resolve_vocabulary(load_config(None, ['vocab.classes=["cat, kitty", dog, " Kitty "]']).vocab)
    assert vocab.names == (("cat", "kitty"), ("dog",), ("Kitty",))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "the vocabulary names 'Kitty' in class 0 ('cat, kitty') and in class 2 ('Kitty'): both classes score it"
    ]


def test_a_stored_vocabulary_with_a_shared_word_loads_and_its_run_resumes(tmp_path):
    # As ADE20K's full names: "car, auto, automobile, machine, motorcar" and "computer, ..., machine".
    entries = ["car, auto, machine", "computer, machine", "cat"]
    (tmp_path / "vocab.json").write_text(json.dumps({"classes": entries}))
    stored = load_vocabulary(str(tmp_path / "vocab.json"))
    assert stored.names[1] == ("computer", "machine")
    cfg = load_config(None, ["input=s.tar", f"vocab.file={tmp_path}/vocab.json", f"output={tmp_path}/out"])
    vocab = resolve_vocabulary(cfg.vocab)
    assert vocab == stored
    assert prepare_output(cfg, vocab) == set()
    write_vocabulary(cfg.output, vocab, ["a photo of a {}."], "0" * 64)
    sink = LabelShardSink(cfg.output, "s", n_classes=3, context=RowContext("maskclip", "tiny", "abc"))
    sink.add(0, "a", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32))
    sink.commit()
    assert load_vocabulary(fs.join(cfg.output, schema.VOCAB_FILE)) == stored
    assert prepare_output(cfg, resolve_vocabulary(cfg.vocab)) == {"s"}  # resumed: _run/vocabulary.json matches


def test_relative_and_absolute_spellings_of_the_same_input_are_one_run(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/s-0.tar").write_bytes(b"")
    (tmp_path / "vocab.txt").write_text("cat\ndog\n")
    monkeypatch.chdir(tmp_path)
    vocab = Vocabulary.from_entries(["cat", "dog"])
    out = str(tmp_path / "out")
    spellings = [
        ["input=data/s-0.tar", "vocab.file=vocab.txt"],
        [f"input={tmp_path}/data/s-0.tar", f"vocab.file={tmp_path}/vocab.txt"],
        [f"input=file://{tmp_path}/data/./s-0.tar", "vocab.file=./vocab.txt"],
    ]
    for overrides in spellings:
        assert prepare_output(load_config(None, [*overrides, f"output={out}"]), vocab) == set()
    with pytest.raises(OutputConflict, match="differing keys: input"):
        prepare_output(load_config(None, ["input=data/s-1.tar", "vocab.file=vocab.txt", f"output={out}"]), vocab)


def test_a_run_recorded_with_the_default_head_by_name_reads_back_unnamed_and_resumes(tmp_path):
    # Releases before head.name could be null recorded `maskclip` for every run, a student's included.
    vocab = Vocabulary.from_entries(["cat", "dog"])
    out = str(tmp_path / "out")
    recorded = load_config(None, ["input=s.tar", f"output={out}", "head.name=maskclip"])
    assert prepare_output(recorded, vocab) == set()  # writes _run/config.yaml naming the head
    assert "name: maskclip" in (tmp_path / "out" / schema.CONFIG_FILE).read_text()
    assert read_run_config(out) == load_config(None, ["input=s.tar", f"output={out}"])  # head.name: null
    assert prepare_output(load_config(None, ["input=s.tar", f"output={out}"]), vocab) == set()  # resumes
    for head in ([], ["head.name=maskclip"]):  # the head, unset or named alike, is not listed
        with pytest.raises(OutputConflict, match=r"\(differing keys: infer.crop\)"):
            prepare_output(load_config(None, ["input=s.tar", f"output={out}", "infer.crop=64", *head]), vocab)
    named = load_config(None, ["input=s.tar", f"output={out}", "head.name=maskclip"])
    assert canonical_config(named).head.name == "maskclip"  # stays named, so a student model refuses it
    naclip = load_config(None, ["input=s.tar", f"output={tmp_path}/naclip", "head.name=naclip"])
    prepare_output(naclip, vocab)
    assert read_run_config(naclip.output).head.name == "naclip"  # another head is kept as named


def test_a_commit_that_fails_half_way_leaves_no_final_names(tmp_path):
    out = str(tmp_path / "out")
    sink = LabelShardSink(out, "s", n_classes=3, context=RowContext("maskclip", "tiny", "abc"))
    sink.add(0, "a", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32))
    os.makedirs(tmp_path / "out" / schema.meta_path("s"))  # the Parquet file cannot take its final name
    with pytest.raises(OSError):
        sink.commit()
    for path in (schema.labels_path("s"), schema.meta_path("s"), schema.commit_path("s")):
        assert not fs.exists(fs.join(out, path)), path


def test_files_of_shards_without_a_marker_are_removed_with_the_temporaries(tmp_path):
    out = str(tmp_path / "out")
    for shard in ("kept", "orphan"):
        sink = LabelShardSink(out, shard, n_classes=3, context=RowContext("maskclip", "tiny", "abc"))
        sink.add(0, "a", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32))
        sink.commit()
    fs.remove(fs.join(out, schema.commit_path("orphan")))  # as if the attempt died before its marker
    assert remove_temporaries(out) == 2
    assert sorted(os.listdir(tmp_path / "out/labels")) == ["kept.tar"]
    assert sorted(os.listdir(tmp_path / "out/meta")) == ["kept.parquet"]


def test_yaml_that_does_not_parse_is_one_line_naming_the_file_or_override(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("input: [a\nb: :\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML at line 2, column 2: expected ',' or ']'"):
        load_config(str(bad))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["input={train,val}/x.tar"])
    assert str(err.value).startswith("override 'input={train,val}/x.tar': not valid YAML at line 1, column 12")
    assert str(err.value).endswith("""needs quotes: input='"{train,val}/x.tar"')""")
    assert load_config(None, ['input="{train,val}/x.tar"']).input == ["{train,val}/x.tar"]
