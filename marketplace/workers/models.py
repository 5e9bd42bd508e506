from django.conf import settings
from django.db import models


class Device(models.Model):
    """A contributor's machine running the agent, known by its Ed25519 public key."""

    class State(models.TextChoices):
        ACTIVE = "active"
        DISABLED = "disabled"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="devices")
    name = models.CharField(max_length=100)
    public_key = models.BinaryField(max_length=32)
    secret_hash = models.CharField(max_length=64, unique=True)
    hardware = models.JSONField(default=dict)
    hardware_class = models.CharField(max_length=64, db_index=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    valid_results = models.PositiveIntegerField(default=0)
    invalid_results = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"device {self.pk} {self.name!r} of {self.owner}"
