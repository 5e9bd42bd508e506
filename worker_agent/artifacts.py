"""A content-addressed cache of artifacts (weights, inputs) under the state directory.

Every file is checked against its sha256 before use: streamed downloads are hashed on the way in,
and a file already in the cache is hashed again, because the bytes we compute on are what we sign.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from worker_agent import protocol
from worker_agent.client import AgentClient

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


class ArtifactError(Exception):
    """An artifact is unusable: a bad hash, or bytes that do not match it."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path, client: AgentClient, *, max_bytes: int = 2 << 30) -> None:
        self.root = root
        self.client = client
        self.max_bytes = max_bytes

    def path_for(self, sha256: str) -> Path:
        if not protocol.is_sha256_hex(sha256):
            raise ArtifactError(f"{sha256!r} is not a lowercase hex sha256")
        return self.root / sha256

    def ensure(self, sha256: str) -> Path:
        """The local path of a verified copy of the artifact, fetching it if needed."""
        path = self.path_for(sha256)
        if path.exists():
            if file_sha256(path) == sha256:
                os.utime(path)  # mark as recently used for pruning
                return path
            log.warning("cached artifact %s is corrupt; fetching it again", sha256[:12])
            path.unlink(missing_ok=True)
        return self._fetch(sha256, path)

    def _fetch(self, sha256: str, path: Path) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(f".{sha256}.{os.getpid()}.part")
        try:
            actual = self.client.download(sha256, partial)
            if actual != sha256:
                raise ArtifactError(f"artifact {sha256[:12]} arrived with sha256 {actual[:12]}; discarded")
            os.replace(partial, path)  # only verified bytes ever carry the final name
        finally:
            partial.unlink(missing_ok=True)
        log.debug("fetched artifact %s (%d bytes)", sha256[:12], path.stat().st_size)
        return path

    def prune(self, keep: frozenset[str] = frozenset()) -> None:
        """Delete least recently used artifacts until the cache fits in max_bytes."""
        entries = sorted(
            (entry for entry in self.root.iterdir() if protocol.is_sha256_hex(entry.name)),
            key=lambda entry: entry.stat().st_mtime,
        )
        total = sum(entry.stat().st_size for entry in entries)
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.name not in keep:
                total -= entry.stat().st_size
                entry.unlink(missing_ok=True)
