from celery import shared_task

from marketplace.workunits import leasing, verification
from marketplace.workunits import sweep as sweeping


@shared_task(name="workunits.validate", acks_late=True)
def validate_unit(unit_id: int) -> str:
    return verification.unit_validate(unit_id=unit_id)


@shared_task(name="workunits.expire_leases", acks_late=True)
def expire_leases() -> int:
    return leasing.leases_expire()


@shared_task(name="workunits.sweep", acks_late=True)
def sweep(limit: int = 500) -> dict:
    return sweeping.sweep_run(limit=limit)
