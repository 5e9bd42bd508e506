from __future__ import annotations

from django.conf import settings
from django.db import models


class IdempotencyKey(models.Model):
    """A person's `Idempotency-Key` and the first answer to it, sealed (marketplace/api/idempotency.py)."""

    class State(models.TextChoices):
        IN_FLIGHT = "in_flight"
        DONE = "done"

    # None for the anonymous operations (log in, enrol): their keys share one space.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+", null=True)
    key = models.CharField(max_length=64, unique=True)  # HMAC of the raw key and its scope; never the key
    operation = models.CharField(max_length=200)  # method and path of the first request
    fingerprint = models.CharField(max_length=64)  # HMAC of its parameters (canonical JSON), keyed by the raw key
    state = models.CharField(max_length=16, choices=State.choices, default=State.IN_FLIGHT)
    status_code = models.PositiveSmallIntegerField(null=True)
    body = models.BinaryField(null=True)  # the rendered answer, AES-GCM under the raw key; replayed byte for byte
    content_type = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["created_at"], name="idempotency_key_created")]
