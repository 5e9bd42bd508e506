"""Where artifact bytes live: one small interface, two real backends chosen by settings alone.

`IDLEGRID_STORAGE=filesystem` (the embedded default) keeps one file per blob under IDLEGRID_ARTIFACT_DIR;
`IDLEGRID_STORAGE=s3` keeps one object per blob in an S3-compatible bucket (AWS, MinIO, Ceph...) through
django-storages, so web and Celery processes on several hosts see the same artifacts. Blobs are named by
their sha256 in the same layout on both, `ab/cd/abcd...`, and only this module knows it: callers stream
bytes in with `save`, stream them out with `open`, and hold a local file only while a reader that needs a
path runs (torch, numpy, safetensors): `with storage.local_path(sha256) as path: ...`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from django.conf import settings

from marketplace.core.exceptions import TooLarge, ValidationFailed

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

CHUNK = 1024 * 1024


class BinaryReader(Protocol):
    """What `open` returns: a file object or an HTTP body, read in chunks and closed (`with` closes it)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None, /) -> None: ...


class ArtifactStorage(Protocol):
    """Content-addressed blob storage. Asked for a blob it does not hold, every method but `exists` raises
    FileNotFoundError, on both backends."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def save(self, chunks: Iterable[bytes], *, max_bytes: int, declared_sha256: str | None = None) -> tuple[str, int]:
        """Store the bytes under their sha256; returns (sha256, size). Streams and hashes on the way, never
        holding the blob in memory; refuses (TooLarge, ValidationFailed) past max_bytes or when the bytes
        do not hash to declared_sha256, and then leaves nothing behind."""
        ...

    def open(self, sha256: str) -> BinaryReader: ...

    def local_path(self, sha256: str) -> AbstractContextManager[Path]:
        """A local file holding the blob, for the `with` block only: do not keep the path past it."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the blob; deleting one that is not stored is no error (the row's removal may be retried)."""
        ...

    def temp_files_purge(self, *, older_than: float) -> int:
        """Remove the staging files of uploads that died (a killed process never ran its cleanup) last
        written more than `older_than` seconds ago; returns how many. A live upload writes its file at
        least once per chunk, so an hour-old one is dead."""
        ...


def _blob_name(sha256: str) -> str:
    """The layout both backends share: two levels of fan-out keep directories (and listings) small."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


# --- saving: the part both backends share ------------------------------------------------------------

def _copy_hashing(chunks: Iterable[bytes], handle, *, max_bytes: int) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"the upload exceeds the limit of {max_bytes:,} bytes")
        digest.update(chunk)
        handle.write(chunk)
    return digest.hexdigest(), size


@contextmanager
def _spooled(
    chunks: Iterable[bytes], *, tmp_dir: Path, max_bytes: int, declared_sha256: str | None
) -> Iterator[tuple[Path, str, int]]:
    """The chunks in a temporary file under tmp_dir, hashed on the way: yields (file, sha256, size). The
    hash is known only at the end, so a backend moves or uploads the file under its name inside the block;
    the file is gone when the block ends, whether it was kept, refused or failed."""
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            sha256, size = _copy_hashing(chunks, handle, max_bytes=max_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        if declared_sha256 is not None and declared_sha256 != sha256:
            raise ValidationFailed(f"the upload hashes to {sha256}, not the declared {declared_sha256}")
        yield tmp, sha256, size
    finally:
        tmp.unlink(missing_ok=True)


def _purge_old_files(folder: Path, *, older_than: float) -> int:
    cutoff, removed = time.time() - older_than, 0
    for path in folder.iterdir() if folder.is_dir() else ():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its upload finished (or another purge won) meanwhile
            continue
    return removed


# --- the filesystem (embedded default; one host, or a shared mount) -----------------------------------

class FileSystemStorage:
    """One file per blob at root/ab/cd/<sha256>, moved into place from root/tmp (same filesystem, so the
    rename is atomic: a reader sees the whole file or none)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _file(self, sha256: str) -> Path:
        return self._root / _blob_name(sha256)

    def exists(self, sha256: str) -> bool:
        return self._file(sha256).exists()

    def size(self, sha256: str) -> int:
        return self._file(sha256).stat().st_size

    def save(self, chunks: Iterable[bytes], *, max_bytes: int, declared_sha256: str | None = None) -> tuple[str, int]:
        spool = _spooled(chunks, tmp_dir=self._root / "tmp", max_bytes=max_bytes, declared_sha256=declared_sha256)
        with spool as (tmp, sha256, size):
            final = self._file(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        return sha256, size

    def open(self, sha256: str) -> BinaryReader:
        return self._file(sha256).open("rb")

    @contextmanager
    def local_path(self, sha256: str) -> Iterator[Path]:
        path = self._file(sha256)
        if not path.is_file():
            raise FileNotFoundError(f"no artifact {sha256} is stored")
        yield path  # the stored file itself: nothing to copy or clean up

    def delete(self, sha256: str) -> None:
        self._file(sha256).unlink(missing_ok=True)

    def temp_files_purge(self, *, older_than: float) -> int:
        return _purge_old_files(self._root / "tmp", older_than=older_than)


# --- S3-compatible object storage (several hosts) ------------------------------------------------------

def _missing(exc: ClientError, sha256: str) -> Exception:
    """FileNotFoundError for a missing object, as the filesystem says it; any other error as it is."""
    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
        return FileNotFoundError(f"no artifact {sha256} is stored")
    return exc


class S3ObjectStorage:
    """One object per blob at <prefix>ab/cd/<sha256> in a bucket, through django-storages' S3 backend
    (its settings, boto3 session and per-thread connections; boto3's managed multipart transfers). A PUT is atomic, as the rename
    is on the filesystem: a reader sees the whole object or none."""

    def __init__(self, *, bucket: str, tmp_dir: Path, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 addressing_style: str | None = None) -> None:
        # Imported here, not at the top: the filesystem default should not pay for importing boto3.
        from storages.backends.s3 import S3Storage

        self._s3 = S3Storage(
            bucket_name=bucket, endpoint_url=endpoint_url, region_name=region, access_key=access_key,
            secret_key=secret_key, addressing_style=addressing_style, location="", file_overwrite=True,
            default_acl=None,
        )
        self._prefix, self._tmp_dir = prefix, tmp_dir
        tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _key(self, sha256: str) -> str:
        return self._prefix + _blob_name(sha256)

    def exists(self, sha256: str) -> bool:
        return self._s3.exists(self._key(sha256))

    def size(self, sha256: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return self._client.head_object(Bucket=self._s3.bucket_name, Key=self._key(sha256))["ContentLength"]
        except ClientError as exc:
            raise _missing(exc, sha256) from None

    def save(self, chunks: Iterable[bytes], *, max_bytes: int, declared_sha256: str | None = None) -> tuple[str, int]:
        spool = _spooled(chunks, tmp_dir=self._tmp_dir, max_bytes=max_bytes, declared_sha256=declared_sha256)
        with spool as (tmp, sha256, size):
            if not self.exists(sha256):  # content-addressed: an object under this name holds these bytes
                self._upload(tmp, self._key(sha256))
        return sha256, size

    def _upload(self, file: Path, key: str) -> None:
        """Multipart past the transfer config's threshold, each part read from the file as it is sent. Not
        S3Storage.save: its upload_fileobj held a 64 MiB blob whole in memory (68 MiB traced at the peak;
        this, 13-20 MiB whatever the size: tests/marketplace/artifacts/test_storage.py)."""
        self._client.upload_file(str(file), self._s3.bucket_name, key, Config=self._s3.transfer_config,
                                 ExtraArgs={"ContentType": "application/octet-stream"})

    @property
    def _client(self):
        # This thread's: S3Storage keeps one connection per thread (boto3 resources are not thread-safe).
        return self._s3.connection.meta.client

    def open(self, sha256: str) -> BinaryReader:
        """The object's body as it arrives: S3Storage.open would first copy the whole object into a
        SpooledTemporaryFile (in memory at its default size), before the first byte is served."""
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self._s3.bucket_name, Key=self._key(sha256))["Body"]
        except ClientError as exc:
            raise _missing(exc, sha256) from None

    @contextmanager
    def local_path(self, sha256: str) -> Iterator[Path]:
        """The object copied in bounded chunks to a temporary file under the var dir, deleted on exit."""
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix=f"{sha256[:16]}-")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle, self.open(sha256) as body:
                shutil.copyfileobj(body, handle, CHUNK)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def delete(self, sha256: str) -> None:
        # S3's DELETE answers 204 for a key that is not there: deleting twice is no error, as on disk.
        self._client.delete_object(Bucket=self._s3.bucket_name, Key=self._key(sha256))

    def temp_files_purge(self, *, older_than: float) -> int:
        # Uploads and local_path copies are staged in this host's folder; a multipart upload a killed process
        # left unfinished in the bucket is the bucket's lifecycle rule's to abort (docs/api/artifacts.md).
        return _purge_old_files(self._tmp_dir, older_than=older_than)


# --- chosen by settings ---------------------------------------------------------------------------

def get_storage() -> ArtifactStorage:
    """The backend the settings name, read at each call (tests switch settings per test)."""
    if settings.IDLEGRID_STORAGE == "s3":
        return _s3_storage(
            settings.IDLEGRID_S3_BUCKET, settings.IDLEGRID_S3_PREFIX, settings.IDLEGRID_STORAGE_TMP_DIR,
            settings.IDLEGRID_S3_ENDPOINT_URL, settings.IDLEGRID_S3_REGION, settings.IDLEGRID_S3_ACCESS_KEY_ID,
            settings.IDLEGRID_S3_SECRET_ACCESS_KEY, settings.IDLEGRID_S3_ADDRESSING_STYLE,
        )
    return FileSystemStorage(settings.IDLEGRID_ARTIFACT_DIR)


@lru_cache(maxsize=8)
def _s3_storage(bucket: str, prefix: str, tmp_dir: Path, endpoint_url: str | None, region: str | None,
                access_key: str | None, secret_key: str | None, addressing_style: str | None) -> S3ObjectStorage:
    # One per configuration: a boto3 session and its clients take tens of milliseconds to build.
    return S3ObjectStorage(
        bucket=bucket, prefix=prefix, tmp_dir=tmp_dir, endpoint_url=endpoint_url, region=region,
        access_key=access_key, secret_key=secret_key, addressing_style=addressing_style,
    )
