"""Webhooks to the Standard Webhooks spec (https://www.standardwebhooks.com/): a person's endpoints, the
events that happened to them, and one delivery per (event, endpoint) with the log of its attempts.

A delivery's schedule lives in its row (`next_attempt_at`), never only in a broker's countdown: a broker
that loses its messages loses no event (the sweep, marketplace/webhooks/delivery.py, sends what is due)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

MAX_URL = 2000
BODY_EXCERPT_BYTES = 1024  # of a receiver's answer, kept in its attempt's row


class Endpoint(models.Model):
    """Where a person's events are POSTed. `secret` signs every message; after a rotation the previous
    secret also signs until `previous_secret_expires_at`, so receivers can switch without losing one."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.CharField(max_length=MAX_URL)
    description = models.CharField(max_length=500, blank=True)
    # The event types sent to it; empty: every type.
    event_types = models.JSONField(default=list, blank=True)
    enabled = models.BooleanField(default=True)
    # whsec_ + base64 of 32 random bytes, as the spec writes them. Kept as they are: HMAC needs the key
    # itself (as every Standard Webhooks sender keeps it).
    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["owner", "enabled"], name="webhook_endpoint_owner")]

    def __str__(self) -> str:
        return f"webhook endpoint {self.pk} ({self.url})"


class Event(models.Model):
    """Something that happened to a person, as its receivers get it: `msg_id` is the `webhook-id` header
    (the same on every attempt and replay: receivers deduplicate on it)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_events")
    msg_id = models.CharField(max_length=40, unique=True)
    type = models.CharField(max_length=64, db_index=True)
    data = models.JSONField()
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.type} {self.msg_id}"


class Delivery(models.Model):
    """One event to one endpoint. pending -> succeeded (a 2xx answer) or failed (the schedule ran out);
    a replay makes a finished delivery pending for one more attempt."""

    class State(models.TextChoices):
        PENDING = "pending"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deliveries")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts_made = models.PositiveIntegerField(default=0, help_text="scheduled attempts made (replays not counted)")
    # While pending: when the next attempt is due.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # When a task for the due attempt was last handed to the broker: the sweep hands it again only once this
    # is older than delivery.REQUEUE_SECONDS (the message was lost), so a busy queue is not flooded.
    queued_at = models.DateTimeField(null=True, blank=True)
    # An attempt in progress holds the row until then (a conditional UPDATE claims it): two workers never
    # send one attempt at once; a worker killed mid-attempt frees it when this passes.
    locked_until = models.DateTimeField(null=True, blank=True)
    # The next attempt is a replay asked through the API: it ends the delivery whatever it answers.
    replaying = models.BooleanField(default=False)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["event", "endpoint"], name="webhook_delivery_once")]
        # The sweep's query: pending rows by due time; finished rows never slow it down.
        indexes = [models.Index(fields=["next_attempt_at"], name="webhook_delivery_due",
                                condition=Q(state="pending"))]

    def __str__(self) -> str:
        return f"delivery {self.pk} of {self.event_id} to endpoint {self.endpoint_id} ({self.state})"


class Attempt(models.Model):
    """One POST to a receiver (or one refused before it left: an address the SSRF rules refuse)."""

    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded"  # a 2xx answer
        HTTP_ERROR = "http_error"  # any other status, redirects included (never followed)
        TIMEOUT = "timeout"
        CONNECTION_ERROR = "connection_error"
        REFUSED = "refused"  # the target resolved to an address we do not send to

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField(help_text="1 for the first attempt of the delivery")
    replay = models.BooleanField(default=False)
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    response_body = models.TextField(blank=True, help_text=f"the first {BODY_EXCERPT_BYTES} bytes of the answer")
    address = models.CharField(max_length=64, blank=True, help_text="the IP address connected to")

    class Meta:
        ordering = ["delivery", "number"]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}: {self.outcome}"
