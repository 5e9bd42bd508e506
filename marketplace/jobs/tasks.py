"""Celery tasks of jobs: thin, take ids, call one service each. The registered names ("jobs.split",
"jobs.merge", "jobs.cancel_finish", "jobs.collect_artifacts") are the contract with queued messages and with enqueue_on_commit: never rename them."""

from celery import shared_task

from marketplace.jobs import cancel, services
from marketplace.jobs.artifacts import artifacts_collect
from marketplace.jobs.lifecycle import job_fail


@shared_task(name="jobs.split", acks_late=True)
def job_split_task(job_id: int) -> int:
    try:
        return services.job_split(job_id=job_id)
    except Exception as exc:  # a split that cannot succeed must not leave the job pending forever
        job_fail(job_id=job_id, reason=f"splitting failed: {exc}")
        raise


@shared_task(name="jobs.merge", acks_late=True)
def job_merge_task(job_id: int) -> None:
    services.job_merge(job_id=job_id)


@shared_task(name="jobs.cancel_finish", acks_late=True)
def job_cancel_finish_task(job_id: int) -> None:
    cancel.job_cancel_finish(job_id=job_id)
@shared_task(name="jobs.collect_artifacts", acks_late=True)
def artifacts_collect_task() -> dict[str, int]:
    return artifacts_collect()
