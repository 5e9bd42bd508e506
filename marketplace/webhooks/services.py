"""Webhooks' writes: endpoints (register, change, remove, rotate the secret, test), events and replays.

`event_emit` is what the use cases call when something happens to a person. It writes in the caller's
transaction (the event exists if and only if what it tells of committed) and sends after commit; it never
talks to a receiver itself, so a slow or failing receiver costs the caller nothing (delivery.py sends).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from marketplace.core.exceptions import Conflict, ValidationFailed
from marketplace.core.tasks import enqueue_on_commit
from marketplace.webhooks.catalog import EVENT_TYPES, WEBHOOK_TEST
from marketplace.webhooks.models import Delivery, Endpoint, Event
from marketplace.webhooks.signing import msg_id_new, secret_new
from marketplace.webhooks.targets import target_check

Data = Mapping[str, Any]


def _event_types_clean(event_types: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(event_types))
    unknown = [t for t in chosen if t not in EVENT_TYPES]
    if unknown:
        raise ValidationFailed(f"unknown event types: {', '.join(unknown)}", fields={"event_types": "unknown"})
    return chosen


def endpoint_create(*, owner_id: int, url: str, description: str = "", event_types: Iterable[str] = (),
                    enabled: bool = True) -> Endpoint:
    """Register a receiver (its URL checked against the SSRF rules now, and again at every attempt), with
    a new secret. At most IDLEGRID_WEBHOOKS_MAX_ENDPOINTS per person."""
    target_check(url)
    types = _event_types_clean(event_types)
    with transaction.atomic():
        # The owner's row serializes concurrent registrations of one person, so the cap holds.
        list(get_user_model().objects.select_for_update().filter(pk=owner_id).values_list("pk", flat=True))
        if Endpoint.objects.filter(owner_id=owner_id).count() >= settings.IDLEGRID_WEBHOOKS_MAX_ENDPOINTS:
            raise Conflict(f"at most {settings.IDLEGRID_WEBHOOKS_MAX_ENDPOINTS} webhook endpoints per person; "
                           "delete one first")
        return Endpoint.objects.create(owner_id=owner_id, url=url, description=description, event_types=types,
                                       enabled=enabled, secret=secret_new())


def endpoint_update(*, endpoint: Endpoint, url: str | None = None, description: str | None = None,
                    event_types: Iterable[str] | None = None, enabled: bool | None = None) -> Endpoint:
    if url is not None:
        target_check(url)
        endpoint.url = url
    if description is not None:
        endpoint.description = description
    if event_types is not None:
        endpoint.event_types = _event_types_clean(event_types)
    if enabled is not None:
        endpoint.enabled = enabled
    endpoint.save()
    return endpoint


def endpoint_delete(*, endpoint: Endpoint) -> None:
    """Its deliveries and their attempts go with it (the events stay, for the owner's other endpoints)."""
    endpoint.delete()


def endpoint_secret_rotate(*, endpoint: Endpoint, now: datetime | None = None) -> Endpoint:
    """A new secret signs from now on; the one it replaces keeps signing too for
    IDLEGRID_WEBHOOKS_ROTATION_GRACE_SECONDS, so a receiver can switch at its pace. Rotating again inside
    that time ends the oldest secret at once (two live secrets at most)."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        locked.previous_secret = locked.secret
        locked.previous_secret_expires_at = now + timedelta(seconds=settings.IDLEGRID_WEBHOOKS_ROTATION_GRACE_SECONDS)
        locked.secret = secret_new()
        locked.save(update_fields=["previous_secret", "previous_secret_expires_at", "secret", "updated_at"])
    return locked


def secrets_live(*, endpoint: Endpoint, now: datetime) -> list[str]:
    """The secrets that sign a message sent now: the current one, and the previous one inside its grace."""
    previous = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and previous is not None and previous > now:
        return [endpoint.secret, endpoint.previous_secret]
    return [endpoint.secret]


def listens(*, event_types: list[str], type: str) -> bool:
    return not event_types or type in event_types


def _event_create(*, owner_id: int, type: str, data: Data, endpoints: list[Endpoint]) -> Event:
    now = timezone.now()
    clean = json.loads(json.dumps(data, cls=DjangoJSONEncoder))  # what the receivers will read, stored as such
    with transaction.atomic():
        event = Event.objects.create(owner_id=owner_id, msg_id=msg_id_new(), type=type, data=clean, created_at=now)
        deliveries = Delivery.objects.bulk_create(
            [Delivery(event=event, endpoint=e, next_attempt_at=now, queued_at=now) for e in endpoints])
        for delivery in deliveries:
            enqueue_on_commit("webhooks.deliver", delivery.pk)
    return event


def event_emit(*, owner_id: int, type: str, data: Data | Callable[[], Data]) -> Event | None:
    """Tell the person's enabled endpoints that listen to `type`: one event, one delivery per endpoint,
    sent after the caller's transaction commits. `data` may be a function, called only if somebody listens:
    for a person without endpoints this costs one query and writes nothing."""
    assert type in EVENT_TYPES, f"{type} is not in the catalog"
    endpoints = [e for e in Endpoint.objects.filter(owner_id=owner_id, enabled=True).only("pk", "event_types")
                 if listens(event_types=e.event_types, type=type)]
    if not endpoints:
        return None
    return _event_create(owner_id=owner_id, type=type, data=data() if callable(data) else data, endpoints=endpoints)


def owners_listening(*, type: str, among: Iterable[int] | None = None) -> set[int]:
    """The people with an enabled endpoint that listens to `type` (for events told to many people at once)."""
    rows = Endpoint.objects.filter(enabled=True)
    if among is not None:
        rows = rows.filter(owner_id__in=list(among))
    return {owner for owner, types in rows.values_list("owner_id", "event_types") if listens(event_types=types, type=type)}


def endpoint_test(*, endpoint: Endpoint) -> Delivery:
    """A `webhook.test` event to this endpoint alone (whatever its filter, enabled or not)."""
    event = _event_create(owner_id=endpoint.owner_id, type=WEBHOOK_TEST, endpoints=[endpoint],
                          data={"endpoint": {"id": endpoint.pk, "url": endpoint.url},
                                "message": "a test event from Idlegrid"})
    return Delivery.objects.get(event=event, endpoint=endpoint)


def delivery_replay(*, delivery: Delivery, now: datetime | None = None) -> Delivery:
    """Send the delivery's event again now, with its webhook-id (receivers deduplicate on it). A pending
    delivery's next attempt simply comes forward; a finished one gets one more attempt, which ends it again."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = Delivery.objects.select_for_update().get(pk=delivery.pk)
        if locked.locked_until is not None and locked.locked_until > now:
            raise Conflict("an attempt of this delivery is in progress; replay it once it answered")
        replaying = locked.state != Delivery.State.PENDING
        Delivery.objects.filter(pk=locked.pk).update(state=Delivery.State.PENDING, next_attempt_at=now, queued_at=now,
                                                     replaying=replaying, finished_at=None)
        enqueue_on_commit("webhooks.deliver", locked.pk)
    locked.refresh_from_db()
    return locked


PURGE_BATCH = 5000


def events_purge(*, now: datetime | None = None) -> int:
    """Forget events older than IDLEGRID_WEBHOOKS_RETENTION_DAYS with their deliveries and attempts, except
    those still being delivered (beat runs it hourly, a batch at a time). Returns how many events went."""
    since = (now or timezone.now()) - timedelta(days=settings.IDLEGRID_WEBHOOKS_RETENTION_DAYS)
    old = Event.objects.filter(created_at__lt=since).exclude(deliveries__state=Delivery.State.PENDING)
    ids = list(old.order_by("pk").values_list("pk", flat=True)[:PURGE_BATCH])
    Event.objects.filter(pk__in=ids).delete()
    return len(ids)
