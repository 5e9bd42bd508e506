from django.conf import settings
from django.db import models


class Device(models.Model):
    """A contributor's machine running the agent, known by its Ed25519 public key."""

    class State(models.TextChoices):
        ACTIVE = "active"
        DISABLED = "disabled"
        BANNED = "banned"  # failed an audit: for good

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="devices")
    name = models.CharField(max_length=100)
    public_key = models.BinaryField(max_length=32)
    secret_hash = models.CharField(max_length=64, unique=True)
    hardware = models.JSONField(default=dict)
    hardware_class = models.CharField(max_length=64, db_index=True)
    # The facts of the machine itself (CPU, OS) as enrolled: a lease request whose facts differ on these is
    # refused; the device must enrol again (HARDWARE_PINNED_FACTS in workers/services.py).
    hardware_enrolled = models.JSONField(default=dict)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    valid_results = models.PositiveIntegerField(default=0)
    invalid_results = models.PositiveIntegerField(default=0)
    audits_passed = models.PositiveIntegerField(default=0)
    audits_failed = models.PositiveIntegerField(default=0)
    # Leases that ended without an answer: given up (`fail`, which also costs a cool-down and the trust run),
    # expired, or handed back unstarted (`release`).
    gave_up = models.PositiveIntegerField(default=0)
    expired = models.PositiveIntegerField(default=0)
    released = models.PositiveIntegerField(default=0)
    # After a give-up the device leases nothing until then.
    cooldown_until = models.DateTimeField(null=True, blank=True)
    banned_at = models.DateTimeField(null=True, blank=True)
    ban_reason = models.TextField(blank=True)
    # Set with a ban: the device's unsettled earnings are held (the payouts ledger forfeits them).
    earnings_held = models.BooleanField(default=False)
    # The capabilities it last reported with a lease request (worker_agent/wire.py Capabilities), recorded
    # at most once per SEEN_RESOLUTION (and when the GPU or the kinds change): what "can any device run
    # this job" is computed from. Null memory: never reported (an old agent).
    cap_memory_mb = models.PositiveIntegerField(null=True, blank=True)
    cap_gpu_mb = models.PositiveIntegerField(default=0)
    cap_kinds = models.CharField(max_length=600, default="", blank=True)  # ",fedavg,inference,": a portable `contains`
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"device {self.pk} {self.name!r} of {self.owner}"


class DeviceTrust(models.Model):
    """Earned trust of one device for one task kind on one hardware class.

    probation -> trusted after N consecutive valid replicated results; any invalid result or expired
    lease sends it back to probation; a failed audit bans the device itself."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="trust")
    kind = models.CharField(max_length=32)
    hardware_class = models.CharField(max_length=64)
    consecutive_valid = models.PositiveIntegerField(default=0)
    trusted_since = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["device", "kind", "hardware_class"], name="trust_unique")]

    @property
    def trusted(self) -> bool:
        return self.trusted_since is not None

    def __str__(self) -> str:
        return f"trust of device {self.device_id} for {self.kind}: {'trusted' if self.trusted else 'probation'}"


class HardwareChange(models.Model):
    """A device's hardware class changed (new torch, another environment): the new class starts on
    probation, and changes are limited per day (IDLEGRID_HARDWARE_CHANGES_PER_DAY)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="hardware_changes")
    old_class = models.CharField(max_length=64)
    new_class = models.CharField(max_length=64)
    changed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["device", "changed_at"])]

    def __str__(self) -> str:
        return f"device {self.device_id}: {self.old_class[:12]} -> {self.new_class[:12]}"
