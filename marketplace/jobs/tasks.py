from celery import shared_task

from marketplace.jobs import services


@shared_task(name="jobs.split", acks_late=True)
def split_job(job_id: int) -> int:
    try:
        return services.job_split(job_id=job_id)
    except Exception as exc:  # a split that cannot succeed must not leave the job pending forever
        services.job_fail(job_id=job_id, reason=f"splitting failed: {exc}")
        raise


@shared_task(name="jobs.merge", acks_late=True)
def merge_job(job_id: int) -> None:
    services.job_merge(job_id=job_id)
