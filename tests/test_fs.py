"""pipeline.io.fs and TarShardWriter on every kind of store: local folder, memory://, loopback S3."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy

from pipeline.io import fs
from pipeline.io.tarwrite import TarShardWriter

ROOT = Path(__file__).resolve().parents[1]


def _listing(root: str, storage_options: dict | None) -> list[str]:
    filesystem, path = fs.url_to_fs(root, storage_options)
    return sorted(p.rsplit("/", 1)[-1] for p in filesystem.find(path))


def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_put_atomic_then_read_back(storage):
    root, options = storage
    url = fs.join(root, "a/b/blob.bin")
    fs.put_atomic(url, b"\x00\x01payload", options)
    assert fs.read_bytes(url, options) == b"\x00\x01payload"
    fs.put_atomic(url, b"second", options)  # replaces the old content
    assert fs.read_bytes(url, options) == b"second"
    assert _listing(root, options) == ["blob.bin"]  # no temporary file left behind


def test_put_json_and_read_json(storage):
    root, options = storage
    fs.put_json(fs.join(root, "m.json"), {"b": [1, 2], "a": "x"}, options)
    assert fs.read_json(fs.join(root, "m.json"), options) == {"a": "x", "b": [1, 2]}
    assert fs.read_text(fs.join(root, "m.json"), options).startswith("{")


def test_move_replaces_destination_and_removes_source(storage):
    root, options = storage
    src, dst = fs.join(root, "src.txt"), fs.join(root, "sub/dst.txt")
    fs.put_atomic(dst, b"old", options)
    fs.put_atomic(src, b"new", options)
    fs.move(src, dst, options)
    assert not fs.exists(src, options)
    assert fs.read_bytes(dst, options) == b"new"


def test_remove_and_exists(storage):
    root, options = storage
    url = fs.join(root, "gone/file.txt")
    fs.put_atomic(url, b"x", options)
    assert fs.exists(url, options)
    fs.remove(fs.join(root, "gone"), options)
    assert not fs.exists(url, options)
    fs.remove(url, options)  # removing what is not there is not an error


def test_missing_file_error_names_the_url_only(storage):
    root, options = storage
    url = fs.join(root, "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json") as info:
        fs.read_json(url, options)
    assert "testing" not in str(info.value)  # the S3 key and secret are both "testing"


def test_tar_writer_round_trip_keeps_order_and_bytes(storage):
    root, options = storage
    url = fs.join(root, "shards/s-000000.tar")
    with TarShardWriter(url, options) as writer:
        writer.write("000", {"jpg": b"J0", "json": b"{}"})
        writer.write("sub/001", {"seg.png": b"P1", "txt": b"caption"})
    assert writer.count == 2
    data = fs.read_bytes(url, options)
    assert list(_tar_members(data).items()) == [
        ("000.jpg", b"J0"),
        ("000.json", b"{}"),
        ("sub/001.seg.png", b"P1"),
        ("sub/001.txt", b"caption"),
    ]
    assert _listing(fs.join(root, "shards"), options) == ["s-000000.tar"]


def test_tar_writer_is_deterministic(tmp_path):
    urls = [str(tmp_path / f"{i}.tar") for i in range(2)]
    for url in urls:
        with TarShardWriter(url) as writer:
            writer.write("k", {"txt": b"same"})
    assert fs.read_bytes(urls[0]) == fs.read_bytes(urls[1])


def test_tar_writer_abort_leaves_nothing_at_the_final_name(storage):
    root, options = storage
    url = fs.join(root, "shards/s.tar")
    fs.put_atomic(fs.join(root, "shards/keep.txt"), b"k", options)
    with pytest.raises(RuntimeError, match="boom"):
        with TarShardWriter(url, options) as writer:
            writer.write("000", {"txt": b"partial"})
            raise RuntimeError("boom")
    assert not fs.exists(url, options)
    assert _listing(fs.join(root, "shards"), options) == ["keep.txt"]  # the temporary file is gone too


def test_tar_writer_abort_keeps_the_previous_shard(storage):
    root, options = storage
    url = fs.join(root, "s.tar")
    with TarShardWriter(url, options) as writer:
        writer.write("old", {"txt": b"v1"})
    writer = TarShardWriter(url, options)
    writer.write("new", {"txt": b"v2"})
    writer.abort()
    assert _tar_members(fs.read_bytes(url, options)) == {"old.txt": b"v1"}


@pytest.mark.parametrize("key", ["a.b", "x/y.z", "../up", "/abs", "a/../../b"])
def test_tar_writer_refuses_keys_that_are_not_plain_relative_names(tmp_path, key):
    writer = TarShardWriter(str(tmp_path / "s.tar"))
    with pytest.raises(ValueError, match="key"):
        writer.write(key, {"txt": b"x"})
    writer.abort()


def test_temp_names_are_siblings_and_recognised():
    tmp = fs.temp_name("s3://bkt/out/labels/x.tar")
    assert tmp.startswith("s3://bkt/out/labels/_tmp.") and tmp.endswith(".x.tar")
    assert fs.is_temp_name(tmp) and not fs.is_temp_name("s3://bkt/out/labels/x.tar")
    assert fs.temp_name("x.tar") != fs.temp_name("x.tar")


@pytest.mark.s3
def test_s3_endpoint_from_aws_endpoint_url(s3, s3_root, monkeypatch):
    """The standard AWS_ENDPOINT_URL variable reaches the endpoint with no storage_options at all."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    url = f"{s3_root}/env.bin"
    fs.put_atomic(url, b"via env")
    assert fs.read_bytes(url, s3.storage_options) == b"via env"


@pytest.mark.s3
def test_loopback_guard_refuses_other_addresses(s3_root):
    with socket.socket() as sock, pytest.raises(AssertionError, match="only 127.0.0.1"):
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never routable


@pytest.mark.s3
@pytest.mark.parametrize("op", ["read", "swap"])
def test_a_file_replaced_between_its_open_and_its_read(s3, s3_root, op):
    """s3fs opens with a HEAD and reads with a GET bound to the ETag seen then; a writer in between
    (here while the proxy holds the GET back) makes that GET fail, as a lease renewal did to a step
    checking whether the lease's holder was alive. A read then returns the newer file, and a swap
    from the older content loses to the writer."""
    url = f"{s3_root}/lease.json"
    fs.put_atomic(url, b"old", s3.storage_options)
    outcome: dict[str, object] = {}

    def race(options: dict) -> None:
        try:
            outcome["value"] = (
                fs.read_bytes(url, options) if op == "read" else fs.replace_if(url, b"mine", b"old", options)
            )
        except Exception as exc:  # noqa: BLE001 - the thread's error is the test's failure
            outcome["error"] = exc

    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.add(Fault("delay", method="GET", path=r"/lease\.json$", times=1, delay_s=1.5))
        racer = threading.Thread(target=race, args=({**s3.storage_options, "endpoint_url": proxy.url},))
        racer.start()
        deadline = time.monotonic() + 10
        while ("GET", "/" + url.split("://", 1)[1]) not in proxy.requests:
            assert time.monotonic() < deadline, "the read never reached the store"
            time.sleep(0.02)
        fs.put_atomic(url, b"new", s3.storage_options)
        racer.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["value"] == (b"new" if op == "read" else False)
    assert fs.read_bytes(url, s3.storage_options) == b"new"


@pytest.mark.s3
def test_a_store_that_stays_busy_is_an_error_not_a_lost_race(s3, s3_root):
    """s3fs raises the same errno for a 503 it has given up on as for a replaced file: the swap must
    not report another writer's win when nobody wrote, and a read must fail without retrying more."""
    url = f"{s3_root}/latest.json"
    fs.put_atomic(url, b"old", s3.storage_options)
    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.add(Fault("503", method="GET", path=r"/latest\.json$"))
        options = {
            **s3.storage_options,
            "endpoint_url": proxy.url,
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        }
        with pytest.raises(OSError):
            fs.replace_if(url, b"mine", b"old", options)
        swap_gets = _gets(proxy, "/latest.json")  # s3fs's own retries of one read
        with pytest.raises(OSError):
            fs.read_bytes(url, options)
    assert swap_gets > 0 and _gets(proxy, "/latest.json") == 2 * swap_gets  # no retries of ours on top
    assert fs.read_bytes(url, s3.storage_options) == b"old"


def _gets(proxy: FaultProxy, suffix: str) -> int:
    return sum(1 for method, path in proxy.requests if method == "GET" and path.endswith(suffix))


@pytest.mark.parametrize("command", ["label", "review", "eval"])
def test_an_unreachable_endpoint_is_one_line_naming_it_and_exit_1(tmp_path, unreachable_store, command):
    """A mistyped or down endpoint, given in storage_options or AWS_ENDPOINT_URL, stops a command
    before any work with one line naming the endpoint, not botocore's traceback. AWS_MAX_ATTEMPTS=1
    bounds botocore's retries; s3fs's own (about 2 s of backoff) remain, as for any user."""
    env = dict(unreachable_store)
    dead_endpoint = env.pop("AWS_ENDPOINT_URL")  # label names it in storage_options, the others in the env
    args = {
        "label": [
            "label",
            os.devnull,
            "input=s3://qa-bucket/in",
            "output=s3://qa-bucket/x",
            f"storage_options.endpoint_url={dead_endpoint}",
        ],
        "review": ["review", "s3://qa-bucket/out2"],
        "eval": ["eval", "--truth", "s3://qa-bucket/truth", "--pred", "s3://qa-bucket/out"],
    }[command]
    if command != "label":
        env["AWS_ENDPOINT_URL"] = dead_endpoint
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 30
    err = [line for line in done.stderr.strip().splitlines() if " | INFO | " not in line]  # log records
    assert done.returncode == 1 and len(err) == 1, done.stderr  # 1: the store may come back, a retry may pass
    assert err[0].startswith(
        f"clipdense {command}: error: object store endpoint {dead_endpoint} could not be reached ("
    )
    assert "AWS_ENDPOINT_URL" in err[0] and "Traceback" not in done.stderr


def test_an_unreachable_endpoint_is_named_by_scheme_host_and_port_only():
    """The endpoint in the message drops a user name, password, path and query the URL may carry."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    url = "https://me:pw@minio.internal:9000/bkt/key?X-Amz-Signature=abc"
    for exc in (EndpointConnectionError(endpoint_url=url, error=OSError()), ConnectTimeoutError(endpoint_url=url)):
        problem = fs.storage_problem(exc)
        assert problem is not None and problem.passing
        reason = problem.reason
        assert reason.startswith("object store endpoint https://minio.internal:9000 could not")
        assert "pw" not in reason and "bkt" not in reason and "abc" not in reason
    assert fs.storage_problem(ValueError("not a store error")) is None
