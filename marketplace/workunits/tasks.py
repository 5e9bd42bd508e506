from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge_if_done
from marketplace.jobs.tasks import merge_job, split_job
from marketplace.workunits import leasing, verification
from marketplace.workunits.models import WorkUnit


@shared_task(name="workunits.validate", acks_late=True)
def validate_unit(unit_id: int) -> str:
    return verification.unit_validate(unit_id=unit_id)


@shared_task(name="workunits.expire_leases", acks_late=True)
def expire_leases() -> int:
    return leasing.leases_expire()


@shared_task(name="workunits.sweep", acks_late=True)
def sweep(limit: int = 500) -> dict:
    """The safety net: whatever a lost broker message left undone, the database still says, so redo it."""
    stale = timezone.now() - timedelta(seconds=5)
    units = list(WorkUnit.objects.filter(need_validate=True).values_list("pk", flat=True)[:limit])
    for unit_id in units:
        verification.unit_validate(unit_id=unit_id)
    pending = list(Job.objects.filter(state=Job.State.PENDING, created_at__lt=stale).values_list("pk", flat=True))
    for job_id in pending:
        split_job.delay(job_id)
    for job_id in Job.objects.filter(state=Job.State.RUNNING).values_list("pk", flat=True):
        job_merge_if_done(job_id=job_id)
    merging = list(Job.objects.filter(state=Job.State.MERGING).values_list("pk", flat=True))
    for job_id in merging:
        merge_job.delay(job_id)
    return {"validated": len(units), "split": len(pending), "merging": len(merging)}
