from django.conf import settings
from django.db import models
from django.db.models import Q


class WorkUnit(models.Model):
    """One verifiable piece of a job. pending -> done (has a canonical result) or error."""

    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        ERROR = "error"

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="units")
    index = models.PositiveIntegerField()
    payload = models.JSONField()
    inputs = models.ManyToManyField("artifacts.Artifact", related_name="+")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    quorum = models.PositiveSmallIntegerField(default=2)
    max_results = models.PositiveSmallIntegerField(default=6)
    results_created = models.PositiveSmallIntegerField(default=0)
    # Set by a report, cleared by validation: the validator's work queue survives a lost broker message.
    need_validate = models.BooleanField(default=False)
    # No database constraint: a finished job's results move to ResultArchive (workunits/archive.py) and keep
    # their ids, so this names a row of either table; archive.result_of reads it wherever it is.
    canonical_result = models.ForeignKey(
        "workunits.Result", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    error = models.TextField(blank=True)
    # The marketplace's Ed25519 signature over the unit id and payload; the agent checks it before running.
    signature = models.BinaryField(max_length=64, null=True, blank=True)
    signing_key_id = models.CharField(max_length=64, blank=True)
    # A known-answer unit copies a decided unit; its result is checked against that unit's answer.
    known_answer_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    # How many known-answer copies of this (decided) unit were made: bounded by IDLEGRID_KNOWN_ANSWER_MAX_COPIES.
    known_answer_copies = models.PositiveSmallIntegerField(default=0)
    # Rows of the submitter's own known answers hidden among the unit's rows, [[position, known row], ...]:
    # server-side only (never in the payload), checked at validation and dropped from the merged output.
    hidden_rows = models.JSONField(default=list, blank=True)
    # An audit: a unit whose first replica went to a trusted device but which is replicated all the same.
    audit = models.BooleanField(default=False)
    # Whether the replication level was chosen (at the first lease, from the leasing device's trust).
    replication_decided = models.BooleanField(default=False)
    # What the unit needs of a device (workunits/requirements.py), set when it is made; copied onto every
    # replica row, where the lease statement filters on them.
    need_memory_mb = models.PositiveIntegerField(default=0)
    need_device = models.CharField(max_length=8, default="cpu")
    need_gpu_mb = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=32, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["job", "index"], condition=Q(known_answer_of__isnull=True), name="unit_index_unique_per_job"
            ),
            # A cuda unit needs some GPU memory, a cpu unit none: the lease matches device types by that alone.
            models.CheckConstraint(
                condition=Q(need_device="cpu", need_gpu_mb=0) | Q(need_device="cuda", need_gpu_mb__gte=1),
                name="unit_need_device",
            ),
        ]
        indexes = [
            models.Index(fields=["job", "state"]),
            models.Index(fields=["id"], condition=Q(need_validate=True), name="unit_need_validate"),
        ]

    def __str__(self) -> str:
        return f"unit {self.pk} (job {self.job_id} #{self.index}, {self.state})"


class Result(models.Model):
    """One replica of a unit: created unsent, leased to one device until a deadline, then reported and judged."""

    class State(models.TextChoices):
        UNSENT = "unsent"
        IN_PROGRESS = "in_progress"
        REPORTED = "reported"
        VALID = "valid"
        INVALID = "invalid"
        EXPIRED = "expired"
        CLIENT_ERROR = "client_error"  # the device gave up on it (`fail`)
        RELEASED = "released"  # the device handed it back unstarted (`release`, at shutdown)
        CANCELLED = "cancelled"

    # No single-column indexes on unit and job: (unit, owner) and (job, state) below serve those lookups,
    # and every index on this table is written by every lease and report (a state move is never a HOT
    # update: state is in the partial indexes' predicates).
    unit = models.ForeignKey(WorkUnit, on_delete=models.CASCADE, related_name="results", db_index=False)
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="results", db_index=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.UNSENT)
    device = models.ForeignKey("workers.Device", null=True, blank=True, on_delete=models.PROTECT, related_name="results")
    # Denormalised from device.owner so the lease query can keep two replicas of a unit off one owner.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # The latest a renewal may push lease_expires_at: leased_at + the unit's time limit + the grace.
    lease_deadline = models.DateTimeField(null=True, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    # Indexed by result_output below: the implicit index of a varchar key comes with a second, LIKE-pattern
    # index that no query here uses and every report would write.
    output = models.ForeignKey("artifacts.Artifact", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                               db_index=False)
    signature = models.BinaryField(max_length=64, null=True, blank=True)
    elapsed_seconds = models.FloatField(null=True, blank=True)
    # Fraction done (0..1) the device last reported in a heartbeat while computing; null: never said.
    # Information for job progress and ETA only, never read by verification or the ledger.
    progress = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    # The device's hardware class when it leased: inside one class results may be compared exactly.
    hardware_class = models.CharField(max_length=64, blank=True)
    # Accepted on a trusted device's word alone: re-verified if that device is ever banned.
    accepted_alone = models.BooleanField(default=False)
    # Set by the marketplace only: this row counts, on the original unit, the answer a device gave to a
    # known-answer copy of it (verification._dispute). One computation in two rows: this one is never paid.
    disputes_known_answer = models.ForeignKey(
        WorkUnit, null=True, blank=True, on_delete=models.CASCADE, related_name="+", db_index=False
    )  # indexed where set (result_disputes): almost every row holds null
    # The output disagreed with the submitter's own known answers hidden in the unit (WorkUnit.hidden_rows).
    failed_known_rows = models.BooleanField(default=False)
    # Denormalised from the unit (WorkUnit.need_*, kind) so the lease statement can match a device's
    # capabilities without a join per candidate (marketplace/workunits/leasing.py).
    need_memory_mb = models.PositiveIntegerField(default=0)
    need_device = models.CharField(max_length=8, default="cpu")
    need_gpu_mb = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=32, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(need_device="cpu", need_gpu_mb=0) | Q(need_device="cuda", need_gpu_mb__gte=1),
                name="result_need_device",
            ),
        ]
        indexes = [
            # The lease query reads only unsent rows; finished rows never enter this index.
            models.Index(fields=["id"], condition=Q(state="unsent"), name="result_unsent"),
            # ... and a CPU device's lease reads only unsent cpu rows: a backlog of cuda units at the head of
            # the queue does not make every CPU device's lease scan past it (leasing.py).
            models.Index(fields=["id"], condition=Q(state="unsent", need_gpu_mb=0), name="result_unsent_cpu"),
            models.Index(fields=["lease_expires_at"], condition=Q(state="in_progress"), name="result_in_progress"),
            # The leases a device holds now: its quota is counted on every lease request.
            models.Index(fields=["device"], condition=Q(state="in_progress"), name="result_held"),
            models.Index(fields=["unit", "owner"]),
            models.Index(fields=["job", "state"]),
            models.Index(fields=["output"], name="result_output"),
            models.Index(fields=["disputes_known_answer"], condition=Q(disputes_known_answer__isnull=False),
                         name="result_disputes"),
        ]

    def __str__(self) -> str:
        return f"result {self.pk} (unit {self.unit_id}, {self.state})"


class ResultArchive(models.Model):
    """A Result of a finished job, moved out of the hot table (workunits/archive.py says when and why).

    The same columns as Result, under the same id (nothing else in the database changes: the Earning
    that paid it and the unit whose canonical result it is still name that id), plus when it moved.
    Written once by the archiver and never updated: no partial index of the lease, no lease columns
    indexed, only what the history pages and the ledger check look rows up by (job, unit, device,
    output). tests/marketplace/workunits/test_archive.py checks the columns against Result's."""

    id = models.BigIntegerField(primary_key=True)
    unit = models.ForeignKey(WorkUnit, on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="+", db_index=False)  # (job, state)
    state = models.CharField(max_length=16, choices=Result.State.choices)
    device = models.ForeignKey("workers.Device", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                              related_name="+", db_index=False)
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_deadline = models.DateTimeField(null=True, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    # Indexed: artifact collection asks whether any row names an output (jobs/artifacts.py).
    output = models.ForeignKey("artifacts.Artifact", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    signature = models.BinaryField(max_length=64, null=True, blank=True)
    elapsed_seconds = models.FloatField(null=True, blank=True)
    progress = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    hardware_class = models.CharField(max_length=64, blank=True)
    accepted_alone = models.BooleanField(default=False)
    disputes_known_answer = models.ForeignKey(WorkUnit, null=True, blank=True, on_delete=models.CASCADE,
                                              related_name="+", db_index=False)
    failed_known_rows = models.BooleanField(default=False)
    need_memory_mb = models.PositiveIntegerField(default=0)
    need_device = models.CharField(max_length=8, default="cpu")
    need_gpu_mb = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=32, default="")
    created_at = models.DateTimeField()
    archived_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["job", "state"], name="result_archive_job_state")]

    def __str__(self) -> str:
        return f"archived result {self.pk} (unit {self.unit_id}, {self.state})"
