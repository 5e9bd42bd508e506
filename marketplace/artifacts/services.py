from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ValidationFailed
from marketplace.workers.models import Device
from worker_agent.protocol import is_sha256_hex


def artifact_store(
    *,
    chunks: Iterable[bytes],
    uploaded_by: AbstractBaseUser | None = None,
    device: Device | None = None,
    declared_sha256: str | None = None,
    max_bytes: int | None = None,
) -> tuple[Artifact, bool]:
    """Store a blob by content; returns (artifact, created). Uploading the same bytes twice is a no-op."""
    if declared_sha256 is not None and not is_sha256_hex(declared_sha256):
        raise ValidationFailed("X-Content-SHA256 must be 64 lowercase hex digits")
    sha256, size = get_storage().save(
        chunks, max_bytes=max_bytes or settings.IDLEGRID_MAX_ARTIFACT_BYTES, declared_sha256=declared_sha256
    )
    artifact, created = Artifact.objects.get_or_create(
        sha256=sha256, defaults={"size": size, "uploaded_by": uploaded_by, "uploaded_by_device": device}
    )
    if uploaded_by is not None:
        artifact.owners.add(uploaded_by)
    if device is not None:
        artifact.devices.add(device)  # it holds these bytes: it may report them (results._check_output)
    return artifact, created
