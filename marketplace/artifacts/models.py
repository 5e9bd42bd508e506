from django.conf import settings
from django.db import models
from django.utils import timezone


class Artifact(models.Model):
    """A content-addressed blob: its name is its sha256; the bytes live in storage, never in the database."""

    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    uploaded_by_device = models.ForeignKey(
        "workers.Device", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Everyone who uploaded these bytes may use them (content addressing dedups across people).
    owners = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="+")
    # Every device that uploaded these bytes: a device may report only an output it holds (possession, not
    # knowledge of a hash), and two honest devices of one hardware class upload the very same bytes.
    devices = models.ManyToManyField("workers.Device", blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # The last time anyone stored these bytes (a dedup'd upload too): collection spares an artifact for a
    # grace period after it, so a device's output waiting for its report, or a re-upload of old bytes for
    # a job about to be submitted, is never collected under it (marketplace/jobs/artifacts.py).
    stored_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.sha256[:12]}… ({self.size:,} bytes)"


class TensorHeader(models.Model):
    """What a report checks of an output, read once when a device's bytes arrived (an upload, or an inline
    output of a batched report): core.tensors.TensorSummary as JSON. A report compares it with the unit
    instead of opening and parsing the file again (issue 14: that read was a fifth of a report's time).
    Absent for bytes no device sent, and for a header too large to keep: a report then reads the file and
    keeps the summary it took. Content-addressed like its artifact, so it never changes once written."""

    artifact = models.OneToOneField(Artifact, primary_key=True, on_delete=models.CASCADE, related_name="tensor_header")
    summary = models.JSONField()

    def __str__(self) -> str:
        return f"tensor header of {self.artifact_id[:12]}…"
