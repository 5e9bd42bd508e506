from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.core.exceptions import NotFound
from marketplace.jobs.models import Job
from marketplace.workers.models import Device
from marketplace.workunits.models import Result


def artifact_get_for_user(*, sha256: str, user: AbstractBaseUser) -> Artifact:
    """An artifact the user uploaded or that is the output of one of their jobs."""
    artifact = Artifact.objects.filter(sha256=sha256).first()
    if artifact is None:
        raise NotFound(f"no artifact {sha256}")
    if artifact.owners.filter(pk=user.pk).exists() or Job.objects.filter(owner=user, output=artifact).exists():
        return artifact
    raise NotFound(f"no artifact {sha256}")  # do not reveal that someone else's artifact exists


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
