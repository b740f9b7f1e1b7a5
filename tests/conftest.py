"""Shared fixtures: storage roots (local, `memory://`, loopback S3) that tests use through `pipeline.io`.

The S3 server is moto's, started in this process on 127.0.0.1 with dummy credentials; tests reach it
through s3fs exactly as a cluster reaches a real bucket, and a socket guard fails any test that
tries to connect anywhere but the loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

S3_BUCKET = "clipdense-test"

# Environment for the whole test run: dummy keys, no profile or config file, no metadata service,
# so botocore can never find real credentials or call out to find some.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class S3Server:
    """The loopback S3 endpoint: `url` is the bucket (`s3://clipdense-test`), `storage_options` reach it."""

    endpoint_url: str
    url: str
    storage_options: dict


@pytest.fixture(scope="session", autouse=True)
def _precision_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The precision probe's per-machine cache lives in the test run's temp folder, not the user's home;
    one folder for the session, so the probe runs once and subprocesses (Ray workers, CLIs) share it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPDENSE_CACHE", str(tmp_path_factory.mktemp("clipdense-cache")))
        yield


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), with one empty bucket, for the whole test run."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing").mkdir(
            S3_BUCKET
        )
        try:
            yield S3Server(endpoint_url=endpoint, url=f"s3://{S3_BUCKET}", storage_options=options)
        finally:
            _clear_s3fs_cache()
            server.stop()


@pytest.fixture
def s3_root(s3: S3Server, loopback_only: None) -> str:
    """A fresh `s3://clipdense-test/<unique>` prefix for one test, with s3fs's instance cache cleared."""
    _clear_s3fs_cache()
    return f"{s3.url}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def memfs() -> Iterator[str]:
    """A fresh `memory://` root for one test, removed afterwards (the memory filesystem is process-wide)."""
    root = f"memory://t{uuid.uuid4().hex[:12]}"
    yield root
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(root):
        filesystem.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict | None]:
    """(root URL, storage_options) for each kind of store, so one test covers all three."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    if request.param == "memory":
        return request.getfixturevalue("memfs"), None
    s3 = request.getfixturevalue("s3")
    return request.getfixturevalue("s3_root"), dict(s3.storage_options)


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything opens a TCP connection to an address other than the loopback one."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else str(address)
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                raise AssertionError(f"test tried to connect to {host}; only 127.0.0.1 is allowed")

    def connect(sock: socket.socket, address: object) -> None:
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: object) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def unreachable_store() -> Iterator[dict[str, str]]:
    """An environment with AWS keys whose S3 endpoint is a loopback port bound but not listening (a
    connection is refused at once); AWS_MAX_ATTEMPTS=1 bounds botocore's retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield env
