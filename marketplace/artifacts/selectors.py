"""Reads of artifacts that need nothing above them (who holds what, how much)."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Sum

from marketplace.artifacts.models import Artifact


def artifacts_quota_used(*, owner: AbstractBaseUser) -> int:
    """Bytes of the artifacts the person holds, each counted once however often they uploaded it; shared
    bytes (content addressing dedups across people) count in full for every holder."""
    return Artifact.objects.filter(owners__pk=owner.pk).aggregate(used=Sum("size"))["used"] or 0
