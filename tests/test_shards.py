"""expand_shards: every spec form on a local folder, memory:// and loopback S3."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline.io import fs
from pipeline.io.shards import expand_braces, expand_shards

NAMES = [f"train-{i:06d}.tar" for i in range(4)]


def _make(root: str, options: dict | None, names: list[str]) -> None:
    filesystem, path = fs.url_to_fs(root, options)
    for folder in {fs.join(path, name).rsplit("/", 1)[0] for name in names}:
        filesystem.makedirs(folder, exist_ok=True)
    filesystem.pipe({fs.join(path, name): b"tar bytes do not matter here" for name in names})


def _names(urls: list[str], root: str) -> list[str]:
    """Paths relative to `root`, after checking each URL is absolute and keeps its protocol."""
    protocol = root.split("://", 1)[0] + "://" if "://" in root else "/"
    assert all(u.startswith(protocol) for u in urls), urls
    return [u.split(root.split("://", 1)[-1].lstrip("/"), 1)[1].lstrip("/") for u in urls]


@pytest.fixture
def shards(storage):
    root, options = storage
    _make(root, options, NAMES + ["val/val-0.tar", "val/val-1.tar", "notes.txt", "_tmp.abc123.train-000009.tar"])
    return root, options


def test_brace_range_keeps_zero_padding(shards):
    root, options = shards
    urls = expand_shards(fs.join(root, "train-{000000..000003}.tar"), options)
    assert _names(urls, root) == NAMES
    for url in urls:  # every URL opens through the same fs layer the reader uses
        assert fs.read_bytes(url, options).startswith(b"tar bytes")


def test_brace_alternatives_and_nested_groups(shards):
    root, options = shards
    urls = expand_shards(fs.join(root, "{train-00000{2,0},val/val-{1..0}}.tar"), options)
    assert _names(urls, root) == ["train-000002.tar", "train-000000.tar", "val/val-1.tar", "val/val-0.tar"]


def test_glob_is_sorted_and_skips_temporary_files(shards):
    root, options = shards
    assert _names(expand_shards(fs.join(root, "train-*.tar"), options), root) == NAMES
    assert _names(expand_shards(fs.join(root, "*/val-?.tar"), options), root) == ["val/val-0.tar", "val/val-1.tar"]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_folder_gives_its_tar_files_sorted(shards, suffix):
    root, options = shards
    assert _names(expand_shards(root + suffix, options), root) == NAMES  # not notes.txt, not _tmp.*, not val/


def test_list_keeps_order_expands_each_element_and_drops_repeats(shards):
    root, options = shards
    spec = [fs.join(root, "val"), fs.join(root, "train-00000{1,0}.tar"), fs.join(root, "val/val-0.tar")]
    urls = expand_shards(spec, options)
    assert _names(urls, root) == ["val/val-0.tar", "val/val-1.tar", "train-000001.tar", "train-000000.tar"]


def test_braces_over_folders_and_globs(shards):
    root, options = shards
    urls = expand_shards(fs.join(root, "{val,train-00000[23].tar}"), options)
    assert _names(urls, root) == ["val/val-0.tar", "val/val-1.tar", "train-000002.tar", "train-000003.tar"]


@pytest.mark.parametrize("pattern", ["nothing-{0..3}.tar", "nothing-*.tar", "missing-folder", "train-000099.tar"])
def test_spec_matching_nothing_is_an_error_naming_it(shards, pattern):
    root, options = shards
    spec = fs.join(root, pattern)
    with pytest.raises(ValueError, match="matches no shard") as info:
        expand_shards(spec, options)
    assert repr(spec) in str(info.value)
    assert "secret" not in str(info.value) and "testing" not in str(info.value)  # never the storage options


def test_list_element_matching_nothing_is_an_error_naming_it(shards):
    root, options = shards
    bad = fs.join(root, "typo-000000.tar")
    with pytest.raises(ValueError, match="typo-000000.tar"):
        expand_shards([fs.join(root, "train-000000.tar"), bad], options)


def test_brace_gaps_are_dropped_with_a_warning(shards, caplog):
    root, options = shards
    with caplog.at_level(logging.WARNING, logger="pipeline.io.shards"):
        urls = expand_shards(fs.join(root, "train-{000002..000005}.tar"), options)
    assert _names(urls, root) == ["train-000002.tar", "train-000003.tar"]
    assert "2 of 4 names do not exist" in caplog.text and "train-000004.tar" in caplog.text


def test_relative_local_path_comes_back_absolute(tmp_path, monkeypatch):
    _make(str(tmp_path), None, NAMES[:2])
    monkeypatch.chdir(tmp_path)
    assert expand_shards("train-{000000..000001}.tar") == [str(tmp_path / n) for n in NAMES[:2]]
    assert expand_shards(".") == [str(tmp_path / n) for n in NAMES[:2]]


@pytest.mark.s3
def test_s3_urls_keep_their_protocol(s3, s3_root):
    _make(s3_root, s3.storage_options, NAMES[:2])
    assert expand_shards(f"{s3_root}/", s3.storage_options) == [f"{s3_root}/{n}" for n in NAMES[:2]]


def test_long_brace_range_in_one_folder_keeps_its_order(tmp_path):
    names = [f"s-{i:05d}.tar" for i in range(500)]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    urls = expand_shards(str(tmp_path / "s-{00000..00499}.tar"))
    assert urls == [os.path.join(str(tmp_path), n) for n in names]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a{0..2}", ["a0", "a1", "a2"]),
        ("{08..11}", ["08", "09", "10", "11"]),
        ("{8..11}", ["8", "9", "10", "11"]),
        ("{3..1}", ["3", "2", "1"]),
        ("x{a,b}y{1,2}", ["xay1", "xay2", "xby1", "xby2"]),
        ("{a,b{0..1}}.tar", ["a.tar", "b0.tar", "b1.tar"]),
        ("{,x}y", ["y", "xy"]),
        ("plain.tar", ["plain.tar"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern", ["a{0..2", "a}b", "{single}", "{}"])
def test_malformed_brace_patterns_are_errors_naming_the_spec(pattern):
    with pytest.raises(ValueError, match="input spec") as info:
        expand_braces(pattern)
    assert repr(pattern) in str(info.value)


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="no input shards"):
        expand_shards([])
