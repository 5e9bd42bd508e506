"""Where artifact bytes live. Filesystem now (shared storage when web nodes scale out); the interface is
small so an S3-compatible backend can take its place by settings."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from marketplace.core.exceptions import TooLarge, ValidationFailed

CHUNK = 1024 * 1024


class FileSystemStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def save(self, chunks: Iterable[bytes], *, max_bytes: int, declared_sha256: str | None = None) -> tuple[str, int]:
        """Stream chunks to a temporary file while hashing; move it into place under its hash.

        Never holds the whole blob in memory. Refuses (and leaves nothing behind) past max_bytes or
        when the bytes do not hash to the declared sha256.
        """
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"the upload exceeds the limit of {max_bytes:,} bytes")
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            sha256 = digest.hexdigest()
            if declared_sha256 is not None and declared_sha256 != sha256:
                raise ValidationFailed(f"the upload hashes to {sha256}, not the declared {declared_sha256}")
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # atomic: readers see the whole file or none
            return sha256, size
        finally:
            tmp.unlink(missing_ok=True)


def get_storage() -> FileSystemStorage:
    return FileSystemStorage(settings.IDLEGRID_ARTIFACT_DIR)
