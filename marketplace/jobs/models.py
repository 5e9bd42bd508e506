from django.conf import settings
from django.db import models


class Job(models.Model):
    """A submitter's AI job. pending -> running -> merging -> completed, or failed."""

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        MERGING = "merging"
        COMPLETED = "completed"
        FAILED = "failed"

    class Kind(models.TextChoices):
        INFERENCE = "inference"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    spec = models.JSONField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    error = models.TextField(blank=True)
    units_total = models.PositiveIntegerField(default=0)
    output = models.ForeignKey("artifacts.Artifact", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # How many times a ban reopened the job so that results a cheater vouched for were re-verified
    # (its output is merged anew each time).
    corrections = models.PositiveIntegerField(default=0)
    reopened_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"job {self.pk} ({self.kind}, {self.state})"
