"""The results archive (workunits/archive.py): a finished job's results leave the hot table once the job
ended long ago and their earnings are settled, keeping their ids, and every page, count and ledger check
that read them reads the same after."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.urls import reverse
from django.utils import timezone

from marketplace.jobs.artifacts import artifacts_collect
from marketplace.jobs.live import job_verification
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import job_progress, job_progress_annotated, jobs_for_owner
from marketplace.jobs.services import job_merge
from marketplace.ledger.earnings import earnings_settle
from marketplace.ledger.earnings_report import earnings_report
from marketplace.ledger.models import Earning
from marketplace.ledger.selectors import ledger_check
from marketplace.workunits.archive import results_archive
from marketplace.workunits.known_answers import _pick_source
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, ResultArchive, WorkUnit
from marketplace.workunits.requirements import capacity_of
from marketplace.workunits.verification import unit_validate

DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def no_known_answers(settings):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0


@pytest.fixture
def later(settings):
    """A moment past the archive delay of anything made now."""
    return timezone.now() + timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS) + DAY


@pytest.fixture
def computed(submit_job, make_device, report, contributor, other_contributor, django_capture_on_commit_callbacks):
    """computed(): a 3-unit job computed honestly by two owners and validated, its earnings credited (the
    after-commit hooks run); merged unless merge=False."""

    def make(*, merge: bool = True) -> Job:
        job = submit_job(rows=10, rows_per_unit=4)
        for owner in (contributor, other_contributor):
            device = make_device(owner)
            for lease in workunit_lease(device=device.device, max_units=64):
                report(device, lease.result_id)
        with django_capture_on_commit_callbacks(execute=True):
            for unit in WorkUnit.objects.filter(job=job):
                assert unit_validate(unit_id=unit.pk) == "done"
        if merge:
            job_merge(job_id=job.pk)
        job.refresh_from_db()
        return job

    return make


def settle(now) -> None:
    earnings_settle(now=now)
    assert not Earning.objects.filter(state=Earning.State.HELD).exists()


def rows(model, job: Job) -> dict[int, dict]:
    return {row["id"]: row for row in model.objects.filter(job=job).values(*[f.attname for f in Result._meta.concrete_fields])}


def test_the_archive_has_every_column_of_the_hot_table_with_the_same_type():
    hot = {f.column: f.db_type(connection) for f in Result._meta.concrete_fields}
    archived = {f.column: f.db_type(connection) for f in ResultArchive._meta.concrete_fields}

    assert archived.pop("archived_at")
    # The hot table's id comes from its sequence; the archive keeps that id, in the type a reference to it has.
    hot["id"] = Result._meta.pk.rel_db_type(connection)
    assert archived == hot


def test_a_long_finished_jobs_settled_results_move_with_their_ids_and_values(computed, later):
    job = computed()
    settle(later)
    before = rows(Result, job)
    assert len(before) == 6

    report = results_archive(now=later)

    assert report == {"moved": 6, "jobs": 1, "batches": 1}
    assert not Result.objects.filter(job=job).exists()
    assert rows(ResultArchive, job) == before
    assert set(ResultArchive.objects.filter(job=job).values_list("archived_at", flat=True)) == {later}


def test_the_units_and_earnings_still_name_the_moved_results(computed, later):
    job = computed()
    settle(later)
    canonical = dict(WorkUnit.objects.filter(job=job).values_list("pk", "canonical_result_id"))
    paid = set(Earning.objects.filter(job=job).values_list("result_id", flat=True))
    assert len(paid) == 6

    results_archive(now=later)

    assert dict(WorkUnit.objects.filter(job=job).values_list("pk", "canonical_result_id")) == canonical
    assert set(ResultArchive.objects.filter(pk__in=paid).values_list("pk", flat=True)) == paid
    assert ledger_check() == []


def test_the_job_pages_and_the_api_count_the_same_after_archiving(computed, later, api, submitter, client):
    job = computed()
    settle(later)
    progress, verification = job_progress(job=job), job_verification(job=job)
    listed = job_progress_annotated(job=jobs_for_owner(owner=submitter).get(pk=job.pk))
    detail = api(submitter).get(f"/api/v1/jobs/{job.pk}/").json()
    assert progress["results_valid"] == 6 and verification["devices"] == 2

    assert results_archive(now=later)["moved"] == 6

    assert job_progress(job=job) == progress
    assert job_verification(job=job) == verification
    assert job_progress_annotated(job=jobs_for_owner(owner=submitter).get(pk=job.pk)) == listed == progress
    assert api(submitter).get(f"/api/v1/jobs/{job.pk}/").json() == detail
    client.force_login(submitter)
    assert client.get(reverse("portal:job", args=[job.pk])).status_code == 200


def test_the_earnings_page_shows_the_same_after_archiving(computed, later, contributor, client):
    computed()
    settle(later)
    before = earnings_report(user=contributor, read_claims=False)

    assert results_archive(now=later)["moved"] == 6

    assert earnings_report(user=contributor, read_claims=False) == before
    client.force_login(contributor)
    assert client.get(reverse("portal:earnings")).status_code == 200


def test_a_result_whose_earning_is_still_held_never_moves(computed, later):
    job = computed()

    assert results_archive(now=later)["moved"] == 0
    assert Result.objects.filter(job=job).count() == 6


def test_a_recently_finished_job_never_moves(computed, settings):
    job = computed()
    soon = job.finished_at + timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS) - DAY
    settle(soon)

    assert results_archive(now=soon)["moved"] == 0
    assert Result.objects.filter(job=job).count() == 6


def test_a_running_jobs_results_never_move(computed, later):
    job = computed(merge=False)
    settle(later)
    assert job.state == Job.State.MERGING

    assert results_archive(now=later)["moved"] == 0
    assert Result.objects.filter(job=job).count() == 6


def test_nothing_of_a_job_moves_while_one_of_its_results_is_in_progress(computed, later, make_device, people):
    job = computed()
    settle(later)
    unit = WorkUnit.objects.filter(job=job).first()
    device = make_device(people[0]).device
    Result.objects.create(unit=unit, job=job, state=Result.State.IN_PROGRESS, device=device, owner=device.owner,
                          leased_at=timezone.now(), lease_expires_at=timezone.now() + DAY)

    assert results_archive(now=later)["moved"] == 0
    assert Result.objects.filter(job=job).count() == 7


def test_a_reopened_job_never_moves_until_the_delay_passed_again(computed, later, settings):
    job = computed()
    settle(later)
    Job.objects.filter(pk=job.pk).update(reopened_at=later - DAY)

    assert results_archive(now=later)["moved"] == 0
    assert results_archive(now=later + timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS))["moved"] == 6


def test_a_result_reported_inside_the_window_stays_while_the_others_move(computed, later):
    job = computed()
    settle(later)
    late = Result.objects.filter(job=job).order_by("pk").last()
    Result.objects.filter(pk=late.pk).update(reported_at=later - DAY)

    assert results_archive(now=later)["moved"] == 5
    assert list(Result.objects.filter(job=job).values_list("pk", flat=True)) == [late.pk]
    assert job_progress(job=job)["results_valid"] == 6  # counted across both tables
    assert ledger_check() == []


def test_running_it_twice_moves_nothing_more(computed, later):
    job = computed()
    settle(later)
    results_archive(now=later)
    archived = rows(ResultArchive, job)

    assert results_archive(now=later) == {"moved": 0, "jobs": 0, "batches": 0}
    assert rows(ResultArchive, job) == archived


def test_a_run_is_bounded_by_its_batches(computed, later):
    job = computed()
    settle(later)

    assert results_archive(now=later, batch=2, batches=2) == {"moved": 4, "jobs": 1, "batches": 2}
    assert Result.objects.filter(job=job).count() == 2
    assert job_progress(job=job)["results_valid"] == 6
    assert results_archive(now=later, batch=2, batches=2)["moved"] == 2


def test_an_archived_results_output_is_kept_by_artifact_collection(computed, later):
    job = computed()
    settle(later)
    results_archive(now=later)
    outputs = set(ResultArchive.objects.filter(job=job).values_list("output_id", flat=True))
    assert outputs

    artifacts_collect(now=later + 30 * DAY)

    from marketplace.artifacts.models import Artifact

    assert set(Artifact.objects.filter(pk__in=outputs).values_list("pk", flat=True)) == outputs


def test_a_unit_of_a_job_past_half_the_archive_delay_is_no_known_answer_source(computed, settings, make_device, people):
    job = computed()
    device = make_device(people[0]).device
    capacity = capacity_of(None)
    assert _pick_source(device, capacity) is not None  # a unit of the job that just ended

    Job.objects.filter(pk=job.pk).update(
        finished_at=timezone.now() - timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS / 2) - DAY)

    assert _pick_source(device, capacity) is None


def test_the_command_archives_until_nothing_is_left(computed, later, monkeypatch, capsys):
    job = computed()
    settle(later)
    monkeypatch.setattr(timezone, "now", lambda: later)

    call_command("results_archive", "--batch", "4")

    assert "6 result(s) of 1 job(s) archived" in capsys.readouterr().out
    assert not Result.objects.filter(job=job).exists()


def test_beat_runs_it_periodically_and_it_expires_like_the_other_periodic_tasks(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["results-archive"]

    assert entry["task"] == "workunits.archive_results"
    assert entry["schedule"] == timedelta(seconds=settings.IDLEGRID_ARCHIVE_SECONDS)
    assert entry["options"]["expires"] == settings.IDLEGRID_ARCHIVE_SECONDS


@pytest.mark.django_db(transaction=True)
def test_it_runs_beside_a_report_of_another_job(computed, submit_job, make_device, report, later, people):
    job = computed()
    settle(later)
    running = submit_job(rows=4, rows_per_unit=4)
    device = make_device(people[0])
    lease = workunit_lease(device=device.device, max_units=1)[0]
    start, outcome = threading.Barrier(2), {}

    def archive() -> None:
        start.wait()
        try:
            outcome["archive"] = results_archive(now=later)
        finally:
            connections.close_all()

    thread = threading.Thread(target=archive)
    thread.start()
    start.wait()
    reported = report(device, lease.result_id)
    thread.join(timeout=60)

    assert outcome["archive"]["moved"] == 6 and not Result.objects.filter(job=job).exists()
    assert reported.state == Result.State.REPORTED and Result.objects.filter(pk=reported.pk, job=running).exists()
    assert ledger_check() == []


@pytest.mark.django_db(transaction=True)
def test_rows_another_archiver_holds_are_skipped_not_waited_for(computed, later):
    if connection.vendor != "postgresql":
        pytest.skip("row locks (SKIP LOCKED) are PostgreSQL's; SQLite serialises writers")
    job = computed()
    settle(later)
    held = Result.objects.filter(job=job).order_by("pk").first()
    locked, release, outcome = threading.Event(), threading.Event(), {}

    def hold() -> None:
        try:
            with transaction.atomic():
                list(Result.objects.select_for_update().filter(pk=held.pk).values_list("pk", flat=True))
                locked.set()
                release.wait(timeout=60)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(timeout=30)
    outcome["first"] = results_archive(now=later)
    release.set()
    thread.join(timeout=60)

    assert outcome["first"]["moved"] == 5
    assert list(Result.objects.filter(job=job).values_list("pk", flat=True)) == [held.pk]
    assert results_archive(now=later)["moved"] == 1
    assert ledger_check() == []
