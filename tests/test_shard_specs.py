"""expand_shards on names real datasets have: literal paths with glob or brace characters, compressed shards."""

from __future__ import annotations

import logging

import pytest
from test_shards import _make, _names

from pipeline import schema
from pipeline.config import load_config
from pipeline.distribute.job import plan_shards
from pipeline.io import fs
from pipeline.io.shards import expand_shards

ODD = ["photos[2019].tar", "what?.tar", "star*.tar", "x{1}.tar", "{a,b}.tar", "set[2]/s-0.tar", "{raw}/r-0.tar"]
PLAIN = ["photos1.tar", "whatA.tar", "star-2.tar", "a.tar", "b.tar", "set2/s-9.tar"]


@pytest.fixture
def odd(storage):
    root, options = storage
    _make(root, options, ODD + PLAIN)
    return root, options


@pytest.mark.parametrize("name", ["photos[2019].tar", "what?.tar", "star*.tar", "x{1}.tar", "{a,b}.tar"])
def test_an_existing_name_means_itself(odd, name):
    root, options = odd
    assert _names(expand_shards(fs.join(root, name), options), root) == [name]


@pytest.mark.parametrize(("folder", "inside"), [("set[2]", "set[2]/s-0.tar"), ("{raw}", "{raw}/r-0.tar")])
def test_an_existing_folder_with_special_characters_gives_its_shards(odd, folder, inside):
    root, options = odd
    assert _names(expand_shards(fs.join(root, folder), options), root) == [inside]


def test_a_glob_below_an_existing_folder_with_glob_characters_stays_in_that_folder(odd):
    root, options = odd
    assert _names(expand_shards(fs.join(root, "set[2]/*.tar"), options), root) == ["set[2]/s-0.tar"]
    assert _names(expand_shards(fs.join(root, "set[2]/s-?.tar"), options), root) == ["set[2]/s-0.tar"]
    assert _names(expand_shards(fs.join(root, "set[0-9]/*.tar"), options), root) == ["set2/s-9.tar"]  # no such folder
    with pytest.raises(ValueError, match=r"matches no shard"):  # a file's name is no folder
        expand_shards(fs.join(root, "what?.tar/*.tar"), options)


def test_patterns_still_expand_when_no_such_name_exists(odd):
    root, options = odd
    assert _names(expand_shards(fs.join(root, "star-*.tar"), options), root) == ["star-2.tar"]
    assert _names(expand_shards(fs.join(root, "what[A].tar"), options), root) == ["whatA.tar"]
    assert _names(expand_shards(fs.join(root, "{b,a}.tar"), options), root) == ["b.tar", "a.tar"]
    # a brace pattern whose spelled-out names hold glob characters: each name is looked up as written
    assert _names(expand_shards(fs.join(root, "{photos[2019],what?}.tar"), options), root) == [
        "photos[2019].tar",
        "what?.tar",
    ]


def test_compressed_shards_are_listed_and_named_without_their_suffix(tmp_path):
    root = str(tmp_path)
    names = ["a.tar", "b.tar.gz", "c.tgz", "d.tar.bz2", "e.tar.xz"]
    _make(root, None, [*names, "f.zip", "g.gz"])
    urls = expand_shards(root)
    assert _names(urls, root) == names
    assert [schema.shard_name(u) for u in urls] == ["a", "b", "c", "d", "e"]


def test_a_tar_and_its_compressed_copy_are_refused_as_one_output_name(tmp_path):
    root = str(tmp_path)
    _make(root, None, ["a.tar", "a.tar.gz", "b.tgz"])
    cfg = load_config(None, [f"input={root}", f"output={root}/out"])
    with pytest.raises(ValueError, match=r"a\.tar and .*a\.tar\.gz have the same name 'a'; outputs would collide"):
        plan_shards(cfg)


def test_a_folder_of_loose_images_is_named_as_such(storage):
    root, options = storage
    _make(root, options, ["photos/a.jpg", "photos/B.PNG", "photos/notes.txt"])
    with pytest.raises(ValueError, match=r"matches no shard \(the folder holds 2 image files, not tar shards: "):
        expand_shards(fs.join(root, "photos"), options)
    with pytest.raises(ValueError, match=r"matches no shard$"):
        expand_shards(fs.join(root, "photos/*.tar"), options)


def test_hidden_files_are_never_shards_of_a_folder_or_a_glob(storage, caplog):
    """macOS leaves `._NAME` AppleDouble sidecars and `.DS_Store` beside copied files; they are not tars."""
    root, options = storage
    _make(root, options, ["s4/macos.tar", "s4/._macos.tar", "s4/.DS_Store", "s4/README.txt", "s4/.hidden.tar"])
    for spec in ("s4", "s4/", "s4/*.tar", "s4/*"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.io.shards"):
            assert _names(expand_shards(fs.join(root, spec), options), root) == ["s4/macos.tar"], spec
        skipped = [r.getMessage() for r in caplog.records if "hidden files skipped" in r.getMessage()]
        hidden = 2 if spec.endswith(".tar") else 3  # .DS_Store too
        assert len(skipped) == 1 and f": {hidden} hidden files skipped" in skipped[0], (spec, skipped)
    assert _names(expand_shards(fs.join(root, "s4/._macos.tar"), options), root) == ["s4/._macos.tar"]  # named: kept
