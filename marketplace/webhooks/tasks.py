"""Celery tasks of webhooks: thin, take ids, call one service each. The registered names are the contract
with queued messages, beat's schedule and enqueue_on_commit: never rename them.

`webhooks.deliver` talks to receivers the marketplace does not control: it runs on its own queue
(CELERY_TASK_ROUTES, IDLEGRID_WEBHOOKS_QUEUE) so slow receivers never hold the workers that split and merge
jobs, and with time limits past the attempt's own deadline (delivery.py) as the last guard."""

from celery import shared_task

from marketplace.webhooks import delivery, services


@shared_task(name="webhooks.deliver", acks_late=True, soft_time_limit=60, time_limit=90)
def delivery_attempt_task(delivery_id: int) -> str:
    return delivery.delivery_attempt(delivery_id=delivery_id)


@shared_task(name="webhooks.sweep", acks_late=True)
def deliveries_sweep_task(limit: int = 500) -> int:
    return delivery.deliveries_sweep(limit=limit)


@shared_task(name="webhooks.purge", acks_late=True)
def events_purge_task() -> int:
    return services.events_purge()
