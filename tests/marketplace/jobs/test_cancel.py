"""Cancelling a job: it stops at once (nothing leased, leases revoked, late reports refused), the reports it
already had are judged and what is valid is paid, the unused escrow returns exactly, and the decided rows
are kept as a partial output with a mask."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load

from marketplace.core.exceptions import LeaseCancelled
from marketplace.jobs.cancel import job_cancel, job_cancel_finish
from marketplace.jobs.lifecycle import job_fail, job_merge_if_done, job_reopen
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge, job_split
from marketplace.jobs.tasks import job_cancel_finish_task
from marketplace.ledger.models import Account, Earning, Posting
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import ledger_check
from marketplace.workunits.cancel import UNDECIDED_REASON
from marketplace.workunits.leasing import lease_renew, leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue
from marketplace.workunits.sweep import sweep_run
from marketplace.workunits.verification import unit_validate
from tests.conftest import stored_bytes

PRICE = 10**15  # the default IDLEGRID_PRICE_PER_RESULT
CAP = 6  # the default max_results_per_unit: what a job escrows for, per unit
K = Account.Kind


@pytest.fixture(autouse=True)
def no_known_answers(settings):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0  # random by design; the test that wants one asks for it


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """committed(fn, **kw): run fn with its after-commit work done (the ledger's postings, tasks sent)."""

    def run(fn, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return fn(**kwargs)

    return run


@pytest.fixture
def two_devices(make_device, contributor, other_contributor):
    return make_device(contributor, name="alice-box"), make_device(other_contributor, name="bob-box")


def escrow(job) -> int:
    return balance(account_get(K.JOB_ESCROW, job_id=job.pk))


def available(user) -> int:
    return balance(account_get(K.SUBMITTER_BALANCE, user_id=user.pk))


def replica(device, unit) -> Result:
    return Result.objects.get(unit=unit, device=device.device)


def units_of(job) -> list[WorkUnit]:
    return list(WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).order_by("index"))


@pytest.fixture
def mid_job(submit_job, two_devices, report, committed):
    """A 14-row job in 4 units (4, 4, 4, 2 rows) caught mid-way, each device holding one replica of every unit:
    #0 decided and paid; #1 answered by both, its validation not yet run; #2 answered by one (the other still
    computing); #3 leased to both, nobody answered."""
    job = submit_job(rows=14, rows_per_unit=4, batch_size=2)
    alice, bob = two_devices
    for device in (alice, bob):
        assert len(workunit_lease(device=device.device, max_units=64)) == 4
    units = units_of(job)
    for device in (alice, bob):
        report(device, replica(device, units[0]))
        report(device, replica(device, units[1]))
    report(alice, replica(alice, units[2]))
    assert committed(unit_validate, unit_id=units[0].pk) == "done"
    return job


def test_a_cancelled_job_is_cancelling_at_once_and_nothing_of_it_is_leased_any_more(
        mid_job, make_device, people, committed, enqueued):
    job = committed(job_cancel, job_id=mid_job.pk, owner=mid_job.owner)

    assert job.state == Job.State.CANCELLING
    assert ("jobs.cancel_finish", (job.pk,)) in enqueued
    assert not Result.objects.filter(job=job, state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).exists()
    assert workunit_lease(device=make_device(people[0]).device, max_units=64) == []


def test_leases_held_at_cancel_are_revoked_and_the_heartbeat_says_lost(mid_job, two_devices):
    alice, bob = two_devices
    held = list(Result.objects.filter(device=bob.device).order_by("pk").values_list("pk", flat=True))
    assert len(held) == 4  # two reported, two in progress

    job_cancel(job_id=mid_job.pk, owner=mid_job.owner)

    renewed, _ = lease_renew(device=bob.device, result_ids=held)
    assert renewed == []  # the agent hears "lost" for the two it computes and kills them
    assert leases_expire() == 0  # revoked leases are not expired, so no replacement is issued


def test_a_report_for_a_revoked_lease_is_refused_and_never_paid(mid_job, two_devices, report, api):
    alice, bob = two_devices
    computing = replica(bob, units_of(mid_job)[3])
    job_cancel(job_id=mid_job.pk, owner=mid_job.owner)

    with pytest.raises(LeaseCancelled, match="cancelled with its job") as refused:
        report(bob, computing)

    assert (refused.value.status, refused.value.code) == (409, "lease_cancelled")
    computing.refresh_from_db()
    assert computing.state == Result.State.CANCELLED
    answer = bob.client().post(f"/api/v1/agent/results/{computing.pk}/fail", {"error": "stopped"}, format="json")
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "lease_cancelled"
    job_cancel_finish(job_id=mid_job.pk)
    assert not Earning.objects.filter(result=computing).exists()


def test_cancel_mid_job_pays_validated_work_returns_the_rest_and_keeps_the_decided_rows(
        mid_job, two_devices, committed, submitter):
    units = units_of(mid_job)
    before = available(submitter)
    escrowed = escrow(mid_job)
    assert escrowed == PRICE * 4 * CAP - 2 * PRICE  # unit #0's two valid results are paid already

    committed(job_cancel, job_id=mid_job.pk, owner=submitter)
    job = committed(job_cancel_finish, job_id=mid_job.pk)

    assert job.state == Job.State.CANCELLED and job.finished_at is not None
    for unit in units:
        unit.refresh_from_db()
    assert [u.state for u in units] == [WorkUnit.State.DONE, WorkUnit.State.DONE, WorkUnit.State.ERROR,
                                        WorkUnit.State.ERROR]
    assert units[3].error == UNDECIDED_REASON
    # Validated work is paid: #0 before the cancel, #1 judged during it (both answers agreed).
    valid = Result.objects.filter(job=job, state=Result.State.VALID)
    assert valid.count() == 4 and Earning.objects.filter(result__in=valid, gross=PRICE).count() == 4
    # #2's lone answer decided nothing: cancelled, unpaid; nothing else of the job is left in flight.
    lone = Result.objects.get(unit=units[2], device=two_devices[0].device)
    assert lone.state == Result.State.CANCELLED and not Earning.objects.filter(result=lone).exists()
    assert set(Result.objects.filter(job=job).values_list("state", flat=True)) == {Result.State.VALID,
                                                                                 Result.State.CANCELLED}
    # The escrow left returns at once, exactly: what four results did not use.
    assert escrow(job) == 0
    assert available(submitter) - before == PRICE * 4 * CAP - 4 * PRICE
    release = Posting.objects.get(kind=Posting.Kind.RELEASE, idempotency_key=f"release:job={job.pk}:0")
    assert sorted(line.amount for line in release.lines.all()) == [-(PRICE * 4 * CAP - 4 * PRICE),
                                                                   PRICE * 4 * CAP - 4 * PRICE]
    # The partial output: y over all 14 rows, the decided ones (#0, #1) filled in, a mask over the rows.
    output = load(stored_bytes(job.output_id))
    assert set(output) == {"y", "mask"}
    assert output["y"].shape == (14, 3) and output["y"].dtype == np.float32
    assert output["mask"].dtype == np.bool_ and output["mask"].tolist() == [True] * 8 + [False] * 6
    canonical = [load(stored_bytes(u.canonical_result.output_id))["y"] for u in units[:2]]
    np.testing.assert_array_equal(output["y"][output["mask"]], np.concatenate(canonical))
    assert not output["y"][~output["mask"]].any()
    assert ledger_check() == []  # balanced, nothing negative, every credit traced to a valid result


def test_the_partial_output_is_downloadable_once_cancelled(mid_job, api, submitter):
    job_cancel(job_id=mid_job.pk, owner=submitter)
    assert api(submitter).get(f"/api/v1/jobs/{mid_job.pk}/output/").status_code == 409  # still cancelling

    job = job_cancel_finish(job_id=mid_job.pk)

    answer = api(submitter).get(f"/api/v1/jobs/{job.pk}/output/")
    assert answer.status_code == 200
    assert b"".join(answer.streaming_content) == stored_bytes(job.output_id)


def test_cancelling_is_idempotent_for_the_owner_only_and_refused_once_the_job_ended(
        api, submitter, other_submitter, submit_job):
    job = submit_job(rows=4, rows_per_unit=4)
    url = f"/api/v1/jobs/{job.pk}/cancel/"

    assert api(other_submitter).post(url).status_code == 404  # not even told it exists
    first, again = api(submitter).post(url), api(submitter).post(url)
    assert (first.status_code, first.json()["state"]) == (200, "cancelling")
    assert (again.status_code, again.json()["state"]) == (200, "cancelling")
    job_cancel_finish(job_id=job.pk)
    done = api(submitter).post(url)
    assert (done.status_code, done.json()["state"]) == (200, "cancelled")

    ended = submit_job(rows=4, rows_per_unit=4)
    job_fail(job_id=ended.pk, reason="a unit failed")
    refused = api(submitter).post(f"/api/v1/jobs/{ended.pk}/cancel/")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
    assert "already failed" in refused.json()["error"]["message"]
    assert Job.objects.get(pk=ended.pk).state == Job.State.FAILED


def test_a_completed_job_cannot_be_cancelled(submit_job, two_devices, report, submitter):
    job = submit_job(rows=4, rows_per_unit=4)
    for device in two_devices:
        for lease in workunit_lease(device=device.device, max_units=64):
            report(device, lease.result_id)
    unit_validate(unit_id=units_of(job)[0].pk)
    assert job_merge(job_id=job.pk).state == Job.State.COMPLETED

    with pytest.raises(Exception, match="already completed") as refused:
        job_cancel(job_id=job.pk, owner=submitter)
    assert refused.value.status == 409


def test_a_job_cancelled_before_its_split_is_never_split_and_gets_its_whole_escrow_back(
        submit_job, submitter, committed, api):
    before = available(submitter)
    job = submit_job(rows=8, rows_per_unit=4, split=False)

    committed(job_cancel, job_id=job.pk, owner=submitter)
    assert job_split(job_id=job.pk) == 0
    job = committed(job_cancel_finish, job_id=job.pk)

    assert (job.state, job.output_id, WorkUnit.objects.filter(job=job).count()) == (Job.State.CANCELLED, None, 0)
    assert available(submitter) == before
    answer = api(submitter).get(f"/api/v1/jobs/{job.pk}/output/")
    assert answer.status_code == 409 and "no output" in answer.json()["error"]["message"]


def test_nothing_moves_a_cancelling_job_back_or_gives_it_more_replicas(mid_job):
    job_cancel(job_id=mid_job.pk, owner=mid_job.owner)
    units = units_of(mid_job)
    results = Result.objects.filter(job=mid_job).count()

    assert replica_issue(unit_id=units[3].pk, reason="results disagree") is False
    job_merge_if_done(job_id=mid_job.pk)
    job_reopen(job_id=mid_job.pk)
    assert job_fail(job_id=mid_job.pk, reason="a unit failed") is False
    assert job_merge(job_id=mid_job.pk).state == Job.State.CANCELLING
    assert Result.objects.filter(job=mid_job).count() == results


def test_the_sweep_finishes_a_job_left_cancelling(mid_job, enqueued, committed):
    # The request committed but its task message was lost (the broker was down, a worker died).
    job_cancel(job_id=mid_job.pk, owner=mid_job.owner)
    assert enqueued == []

    report = sweep_run()

    assert report["cancelling"] == 1 and ("jobs.cancel_finish", (mid_job.pk,)) in enqueued
    committed(job_cancel_finish_task, job_id=mid_job.pk)
    committed(job_cancel_finish_task, job_id=mid_job.pk)  # twice: one ending, one release
    job = Job.objects.get(pk=mid_job.pk)
    assert job.state == Job.State.CANCELLED and job.output_id is not None
    assert Posting.objects.filter(kind=Posting.Kind.RELEASE, idempotency_key__startswith=f"release:job={job.pk}:").count() == 1
    assert sweep_run()["cancelling"] == 0


def test_a_known_answer_copy_of_the_job_out_at_cancel_time_is_cancelled_too(
        mid_job, make_device, people, settings, verification_budget):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0
    verification_budget()
    newcomer = make_device(people[0])
    [lease] = workunit_lease(device=newcomer.device, max_units=1)
    copy = WorkUnit.objects.get(pk=lease.unit_id)
    assert copy.known_answer_of_id == units_of(mid_job)[0].pk

    job_cancel(job_id=mid_job.pk, owner=mid_job.owner)
    job_cancel_finish(job_id=mid_job.pk)

    copy.refresh_from_db()
    assert copy.state == WorkUnit.State.ERROR
    assert Result.objects.get(pk=lease.result_id).state == Result.State.CANCELLED
    assert workunit_lease(device=make_device(people[1]).device, max_units=4) == []  # no copy of a cancelled job


def test_a_ban_after_the_cancel_makes_the_partial_output_again_without_what_the_cheater_vouched_for(
        mid_job, two_devices, committed, submitter, enqueued):
    from marketplace.workunits.reverify import device_ban

    committed(job_cancel, job_id=mid_job.pk, owner=submitter)
    first = committed(job_cancel_finish, job_id=mid_job.pk)
    assert first.output_id is not None

    committed(device_ban, device_id=two_devices[0].pk, reason="caught elsewhere")

    assert Job.objects.get(pk=mid_job.pk).state == Job.State.CANCELLING  # never running again
    assert ("jobs.cancel_finish", (mid_job.pk,)) in enqueued
    job = committed(job_cancel_finish, job_id=mid_job.pk)
    # Units #0 and #1 rested on alice's word and bob's: with alice banned, neither has a quorum any more.
    assert (job.state, job.corrections, job.output_id) == (Job.State.CANCELLED, 1, None)
    assert [u.state for u in units_of(job)] == [WorkUnit.State.ERROR] * 4
    assert not Result.objects.filter(job=job, state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).exists()
    assert escrow(job) == 0  # alice's reversed earnings went back to the submitter too
    assert ledger_check() == []


def test_a_federated_job_cancelled_mid_training_keeps_its_last_aggregated_weights(
        upload, submitter, two_devices, tmp_path, committed):
    from marketplace.jobs.models import FedRound
    from marketplace.jobs.services import job_submit
    from tests.marketplace.jobs.fedavg_helpers import spec_for
    from tests.marketplace.jobs.test_fedavg_rounds import compute

    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, rounds=3))
    job_split(job_id=job.pk)
    compute(two_devices, upload, tmp_path)
    assert job_merge(job_id=job.pk).state == Job.State.RUNNING  # round 1 trains now

    committed(job_cancel, job_id=job.pk, owner=submitter)
    job = committed(job_cancel_finish, job_id=job.pk)

    assert job.state == Job.State.CANCELLED
    assert job.output_id == FedRound.objects.get(job=job, index=0).weights_out_id
    assert escrow(job) == 0
