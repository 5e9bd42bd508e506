"""Celery tasks of the API layer. The registered name is the contract with beat's schedule."""

from celery import shared_task

from marketplace.api.idempotency import idempotency_keys_purge


@shared_task(name="api.purge_idempotency_keys", acks_late=True)
def idempotency_keys_purge_task() -> int:
    return idempotency_keys_purge()
