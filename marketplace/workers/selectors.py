"""Reads of devices for the API."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from marketplace.workers.models import Device


def devices_for_owner(*, owner: AbstractBaseUser) -> QuerySet[Device]:
    return Device.objects.filter(owner=owner).prefetch_related("trust")
