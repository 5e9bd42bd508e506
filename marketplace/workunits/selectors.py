"""Reads of work units and their leases for the API."""

from __future__ import annotations

from django.db.models import Q
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.core.exceptions import NotFound
from marketplace.workers.models import Device
from marketplace.workunits.models import Result


def artifact_get_for_device(*, sha256: str, device: Device) -> Artifact:
    """An artifact the device uploaded or that is an input of a unit it holds a lease on."""
    artifact = Artifact.objects.filter(sha256=sha256).first()
    if artifact is None:
        raise NotFound(f"no artifact {sha256}")
    leased = Result.objects.filter(
        Q(device=device, state=Result.State.IN_PROGRESS, lease_expires_at__gte=timezone.now()) & Q(unit__inputs=artifact)
    ).exists()
    if leased or artifact.devices.filter(pk=device.pk).exists():
        return artifact
    raise NotFound(f"no artifact {sha256} among the inputs of your leases")
