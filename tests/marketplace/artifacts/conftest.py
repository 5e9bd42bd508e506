"""A real S3-compatible server for the storage tests: moto's standalone server, in a process of its own on
a free loopback port, started once per test session and stopped by its handle at the end. Each test gets
a bucket of its own and the settings switched to it (IDLEGRID_STORAGE=s3), as a deployment would set them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from marketplace.artifacts.storage import ArtifactStorage, get_storage

REGION = "us-east-1"
KEY_ID, SECRET = "idlegrid-test-key", "idlegrid-test-secret"  # moto takes any pair; nothing leaves loopback
PREFIX = "idlegrid/artifacts/"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(endpoint: str, process: subprocess.Popen, log: Path, *, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(endpoint, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"moto's server did not answer on {endpoint} within {seconds} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_until_up(endpoint, process, log)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Bucket:
    """The test's bucket, seen with a plain boto3 client: what is in it, independent of the code under test."""

    client: object
    name: str
    prefix: str

    def keys(self) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def key_of(self, sha256: str) -> str:
        return f"{self.prefix}{sha256[:2]}/{sha256[2:4]}/{sha256}"


@pytest.fixture
def s3(settings, s3_endpoint, tmp_path) -> Bucket:
    """Settings switched to S3 (a fresh bucket on the loopback server); returns the bucket to look into."""
    import boto3

    name = f"idlegrid-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=name)
    settings.IDLEGRID_STORAGE = "s3"
    settings.IDLEGRID_S3_BUCKET, settings.IDLEGRID_S3_PREFIX = name, PREFIX
    settings.IDLEGRID_S3_ENDPOINT_URL, settings.IDLEGRID_S3_REGION = s3_endpoint, REGION
    settings.IDLEGRID_S3_ACCESS_KEY_ID, settings.IDLEGRID_S3_SECRET_ACCESS_KEY = KEY_ID, SECRET
    settings.IDLEGRID_S3_ADDRESSING_STYLE = "path"
    settings.IDLEGRID_STORAGE_TMP_DIR = tmp_path / "storage-tmp"
    return Bucket(client=client, name=name, prefix=PREFIX)


@dataclass
class Backend:
    """One backend under test and what it holds, read around it: blob names on disk or keys in the bucket,
    and the temporary files it has left in its working folder."""

    name: str
    storage: ArtifactStorage
    stored: Callable[[], list[str]]
    tmp_dir: Path

    def leftovers(self) -> list[Path]:
        return sorted(self.tmp_dir.iterdir()) if self.tmp_dir.exists() else []


def _files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.parent.name != "tmp")


@pytest.fixture(params=["filesystem", "s3"])
def backend(request, settings, artifact_dir) -> Backend:
    """Each interface test runs against both backends, chosen by settings alone as in a deployment."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3")
        return Backend("s3", get_storage(), bucket.keys, settings.IDLEGRID_STORAGE_TMP_DIR)
    storage = get_storage()
    return Backend("filesystem", storage, lambda: _files(artifact_dir), artifact_dir / "tmp")
