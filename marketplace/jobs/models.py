from django.conf import settings
from django.db import models


class Job(models.Model):
    """A submitter's AI job. pending -> running -> merging -> completed, or failed; or, on the submitter's
    request, cancelling -> cancelled (marketplace/jobs/cancel.py)."""

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        MERGING = "merging"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLING = "cancelling"  # asked to stop: nothing more is leased; reported results are still judged
        CANCELLED = "cancelled"  # stopped: validated work paid, unused escrow returned, partial output kept

    class Kind(models.TextChoices):
        INFERENCE = "inference"
        FEDAVG = "fedavg"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    spec = models.JSONField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    error = models.TextField(blank=True)
    units_total = models.PositiveIntegerField(default=0)
    # Running, but the split is still making units (jobs/services.py, job_split, in committed chunks): the
    # job must not merge yet, and a split that stopped midway is resumed by the sweep.
    splitting = models.BooleanField(default=False)
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


class FedRound(models.Model):
    """One aggregated round of a `fedavg` job: the global weights it trained from, the weights its
    validated updates were aggregated into, and the marketplace's own evaluation of those. A row exists
    only once the round is aggregated (one per round: the unique constraint backs the job row lock)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="rounds")
    index = models.PositiveIntegerField()
    weights_in = models.ForeignKey("artifacts.Artifact", on_delete=models.PROTECT, related_name="+")
    weights_out = models.ForeignKey("artifacts.Artifact", on_delete=models.PROTECT, related_name="+")
    # The canonical results aggregated, in shard order: an update not listed here never touched the model.
    updates = models.JSONField(default=list)
    samples = models.PositiveBigIntegerField()
    train_loss = models.FloatField(help_text="samples-weighted mean of the updates' signed training loss")
    eval_loss = models.FloatField()
    eval_accuracy = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="fedround_unique_per_job")]
        ordering = ["job", "index"]

    def __str__(self) -> str:
        return f"job {self.job_id} round {self.index}"
