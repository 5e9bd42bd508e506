from django.conf import settings
from django.db import models


class EnrollmentToken(models.Model):
    """A one-time token a contributor hands to a new device; only its sha256 is stored."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="enrollment_tokens")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    device = models.OneToOneField("workers.Device", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    def __str__(self) -> str:
        return f"token of {self.owner} ({'used' if self.used_at else 'unused'})"


class ApiTokenInfo(models.Model):
    """What knox's AuthToken does not keep: the name its person gave it and when it was last used.
    One row per token, deleted with it (revoked, expired, logged out)."""

    token = models.OneToOneField("knox.AuthToken", primary_key=True, on_delete=models.CASCADE,
                                 related_name="info", db_column="digest")
    name = models.CharField(max_length=100, blank=True)
    # Written at most once a minute per token (LAST_USE_RESOLUTION in accounts/services.py): not per request.
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"token {self.token_id[:8]}… {self.name!r}"
