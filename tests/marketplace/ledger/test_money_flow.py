"""Money through the marketplace: escrow at submission, a credit per valid result, reversal when a result
is withdrawn, forfeit on a ban, settlement after the audit window, unused escrow back when a job ends."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.lifecycle import job_fail
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge
from marketplace.ledger.earnings import earnings_settle, earnings_sync, result_credit
from marketplace.ledger.escrow import job_escrow_release
from marketplace.ledger.grants import balance_grant
from marketplace.ledger.models import Account, Earning
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import ledger_check, ledger_totals
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.reverify import device_ban

PRICE = 10**15  # the default IDLEGRID_PRICE_PER_RESULT
FEE = PRICE * 500 // 10_000  # the default IDLEGRID_PLATFORM_FEE_BPS
NET = PRICE - FEE
CAP = 6  # the default max_results_per_unit: what a job escrows for, per unit
VERIFICATION_PRICE = 10**15  # the default IDLEGRID_VERIFICATION_PRICE

K = Account.Kind


def available(user) -> int:
    return balance(account_get(K.SUBMITTER_BALANCE, user_id=user.pk))


def escrow(job) -> int:
    return balance(account_get(K.JOB_ESCROW, job_id=job.pk))


def held(device) -> int:
    return balance(account_get(K.CONTRIBUTOR_HELD, device_id=device.pk))


def test_a_job_escrows_what_its_own_spec_can_cost(submit_job, submitter):
    before = available(submitter)

    job = submit_job(rows=8, rows_per_unit=4)  # 2 units, each paid for up to its cap of 6 results

    assert escrow(job) == PRICE * 2 * CAP
    assert available(submitter) == before - PRICE * 2 * CAP
    assert job.spec["price_per_result"] == str(PRICE)


def test_a_job_may_name_its_own_price(submit_job, submitter):
    job = submit_job(rows=4, rows_per_unit=4, price_per_result=str(7 * 10**20))  # beyond 2**63

    assert escrow(job) == 7 * 10**20 * CAP


@pytest.mark.parametrize("price", ["²", "1" * 5000, "-5", 10**37, "1e30"], ids=["superscript", "5000 digits",
                                                                              "negative", "too big", "float text"])
def test_an_unreadable_price_is_a_clear_400(api, inference_spec, submitter, price):
    spec = inference_spec(rows=4, rows_per_unit=4, price_per_result=price)

    response = api(submitter).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 400
    assert "price_per_result" in response.json()["error"]["fields"]
    assert Job.objects.count() == 0


def test_a_submission_the_balance_cannot_cover_is_refused_with_402_and_changes_nothing(
        api, inference_spec, django_user_model):
    poor = django_user_model.objects.create_user("poor")
    balance_grant(user=poor, amount=PRICE, actor="tests", reason="a little", idempotency_key="poor")
    spec = inference_spec(owner=poor, rows=8, rows_per_unit=4)
    postings_before = ledger_totals()

    response = api(poor).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_balance"
    assert error["fields"] == {"required": str(PRICE * 2 * CAP), "available": str(PRICE)}
    assert Job.objects.count() == 0
    assert ledger_totals() == postings_before
    assert available(poor) == PRICE


def test_a_bad_price_is_refused(api, inference_spec, submitter):
    spec = inference_spec(rows=4, rows_per_unit=4, price_per_result=-1)

    response = api(submitter).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 400
    assert "price_per_result" in response.json()["error"]["fields"]


def test_each_valid_result_credits_its_owner_once_minus_the_fee(submit_job, compute_unit):
    job = submit_job(rows=4, rows_per_unit=4)
    unit = WorkUnit.objects.get(job=job)

    (first, r1), (second, r2) = compute_unit(unit)
    for result in (r1, r2):  # the hook ran; running the credit again, and the sweep, change nothing
        assert result_credit(result_id=result.pk) is None
    earnings_sync()

    assert held(first) == held(second) == NET
    assert balance(account_get(K.PLATFORM_FEE)) == 2 * FEE
    assert escrow(job) == (CAP - 2) * PRICE
    assert Earning.objects.filter(state=Earning.State.HELD).count() == 2
    assert ledger_check() == []


def test_the_sweep_credits_a_valid_result_whose_hook_never_ran(submit_job, make_device, report, contributor,
                                                                other_contributor):
    from marketplace.workunits.leasing import workunit_lease
    from marketplace.workunits.verification import unit_validate

    unit = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4))
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        (lease,) = workunit_lease(device=device.device, max_units=1)
        report(device, lease.result_id)
    unit_validate(unit_id=unit.pk)  # its after-commit hooks are dropped, as if the process died
    assert Earning.objects.count() == 0

    assert earnings_sync()["credited"] == 2
    assert earnings_sync()["credited"] == 0
    assert Earning.objects.count() == 2


def test_a_result_past_what_the_escrow_holds_is_paid_from_the_budget_at_the_verification_price(
    submit_job, compute_unit, make_device, cheater, verification_budget
):
    # Re-verification may raise a unit past its cap (a ban, a dispute): when the escrow is spent, the
    # platform pays, at its own reference price out of its budget, never at the submitter's price.
    job = submit_job(rows=4, rows_per_unit=4, quorum=2, max_results_per_unit=2, price_per_result=str(10**20))
    unit = WorkUnit.objects.get(job=job)
    compute_unit(unit)
    assert escrow(job) == 0
    verification_budget(10 * VERIFICATION_PRICE)
    extra = Result.objects.create(unit=unit, job=job, state=Result.State.VALID, device=make_device(cheater).device,
                                  owner=cheater, reported_at=timezone.now())

    earning = result_credit(result_id=extra.pk)

    assert (earning.source, earning.gross, earning.net) == (Earning.Source.PLATFORM, VERIFICATION_PRICE, VERIFICATION_PRICE)
    assert balance(account_get(K.PLATFORM_VERIFICATION)) == 9 * VERIFICATION_PRICE


def test_with_the_budget_spent_such_a_result_is_recorded_unpaid(submit_job, compute_unit, make_device, cheater):
    job = submit_job(rows=4, rows_per_unit=4, quorum=2, max_results_per_unit=2)
    unit = WorkUnit.objects.get(job=job)
    compute_unit(unit)
    extra = Result.objects.create(unit=unit, job=job, state=Result.State.VALID, device=make_device(cheater).device,
                                  owner=cheater, reported_at=timezone.now())

    earning = result_credit(result_id=extra.pk)

    assert (earning.source, earning.state, earning.net, earning.credit) == (
        Earning.Source.UNPAID, Earning.State.UNPAID, 0, None)
    assert balance(account_get(K.PLATFORM_VERIFICATION)) == 0
    assert earnings_sync()["credited"] == 0  # recorded: the sweep does not try it again


def test_a_free_job_pays_nothing_and_records_it(submit_job, compute_unit):
    job = submit_job(rows=4, rows_per_unit=4, price_per_result=0)

    compute_unit(WorkUnit.objects.get(job=job))

    assert set(Earning.objects.values_list("state", flat=True)) == {Earning.State.UNPAID}
    assert earnings_sync()["credited"] == 0


def test_a_withdrawn_result_gives_its_credit_back_to_the_escrow(submit_job, compute_unit, django_capture_on_commit_callbacks):
    from marketplace.workunits.reverify import device_results_reverify

    job = submit_job(rows=4, rows_per_unit=4)
    (first, r1), _ = compute_unit(WorkUnit.objects.get(job=job))
    fees_before = balance(account_get(K.PLATFORM_FEE))

    with django_capture_on_commit_callbacks(execute=True):
        device_results_reverify(device_id=first.pk, since=timezone.now() - timedelta(days=1))

    assert Earning.objects.get(result=r1).state == Earning.State.REVERSED
    assert held(first) == 0
    assert escrow(job) == (CAP - 1) * PRICE  # it regained the price: ready to pay the replica that re-verifies
    assert balance(account_get(K.PLATFORM_FEE)) == fees_before - FEE
    assert ledger_check() == []


def test_a_banned_device_forfeits_its_held_earnings_and_its_withdrawn_results_are_reversed(
        submit_job, compute_unit, django_capture_on_commit_callbacks):
    job = submit_job(rows=8, rows_per_unit=4)
    old_unit, recent_unit = WorkUnit.objects.filter(job=job).order_by("index")
    (cheat, old), (honest, _) = compute_unit(old_unit)
    (_, recent), _ = compute_unit(recent_unit, devices=[cheat, honest])
    # The old result was reported before the re-verification window: it stays valid, its earning still held.
    Result.objects.filter(pk=old.pk).update(reported_at=timezone.now() - timedelta(days=365))
    escrow_before = escrow(job)

    with django_capture_on_commit_callbacks(execute=True):
        assert device_ban(device_id=cheat.pk, reason="failed an audit")

    assert Earning.objects.get(result=old).state == Earning.State.FORFEITED
    assert Earning.objects.get(result=recent).state == Earning.State.REVERSED
    assert escrow(job) == escrow_before + PRICE
    assert held(cheat) == 0
    assert held(honest) == 2 * NET
    assert balance(account_get(K.PLATFORM_FORFEIT)) == NET
    assert ledger_check() == []


def test_held_earnings_settle_after_the_audit_window_only(submit_job, compute_unit, settings):
    job = submit_job(rows=4, rows_per_unit=4)
    (first, r1), (second, _) = compute_unit(WorkUnit.objects.get(job=job))

    assert earnings_settle() is None
    later = timezone.now() + timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS + 1)
    assert earnings_settle(now=later) is not None

    assert held(first) == held(second) == 0
    assert balance(account_get(K.CONTRIBUTOR_SETTLED, user_id=first.owner.pk)) == NET
    assert set(Earning.objects.values_list("state", flat=True)) == {Earning.State.SETTLED}
    assert earnings_settle(now=later) is None


def test_a_failed_job_returns_its_unused_escrow(submit_job, compute_unit, submitter, django_capture_on_commit_callbacks):
    job = submit_job(rows=8, rows_per_unit=4)
    paid_in = available(submitter)
    first_unit = WorkUnit.objects.filter(job=job).order_by("index").first()
    compute_unit(first_unit)

    with django_capture_on_commit_callbacks(execute=True):
        assert job_fail(job_id=job.pk, reason="a unit errored")

    assert escrow(job) == 0
    assert available(submitter) == paid_in + (2 * CAP - 2) * PRICE  # two results were paid of the 12 escrowed
    assert job_escrow_release(job_id=job.pk) is None  # twice: nothing more


def test_every_base_unit_is_accounted_for_when_a_job_completes(submit_job, compute_unit, submitter, make_device,
                                                                contributor, other_contributor,
                                                                django_capture_on_commit_callbacks):
    start = available(submitter)
    job = submit_job(rows=8, rows_per_unit=4)
    devices = [make_device(contributor), make_device(other_contributor)]
    pairs = [p for unit in WorkUnit.objects.filter(job=job) for p in compute_unit(unit, devices=devices)]
    job.refresh_from_db()
    assert job.state == Job.State.MERGING

    with django_capture_on_commit_callbacks(execute=True):
        assert job_merge(job_id=job.pk).state == Job.State.COMPLETED

    paid = start - available(submitter)
    contributors = sum(held(device) for device in {d.pk: d for d, _ in pairs}.values())
    fees = balance(account_get(K.PLATFORM_FEE))
    assert paid == contributors + fees == 4 * PRICE
    assert escrow(job) == 0  # the refund: 12 escrowed, 4 used, 8 back
    assert sum(ledger_totals().values()) == 0
    assert ledger_check() == []


@pytest.mark.django_db(transaction=True)
def test_the_hooks_post_after_real_commits_outside_any_test_transaction(submit_job, compute_unit, submitter):
    """No test transaction around it: each durable posting must really be the outermost transaction."""
    start = available(submitter)
    job = submit_job(rows=4, rows_per_unit=4)
    compute_unit(WorkUnit.objects.get(job=job))

    job_merge(job_id=job.pk)  # autocommit: its after-commit hook runs at once

    assert Job.objects.get(pk=job.pk).state == Job.State.COMPLETED
    assert Earning.objects.count() == 2
    assert start - available(submitter) == 2 * PRICE
    assert ledger_check() == []


def test_a_known_answer_unit_is_paid_by_the_budget_at_the_verification_price(submit_job, make_device, contributor,
                                                                            verification_budget):
    job = submit_job(rows=4, rows_per_unit=4, price_per_result=str(10**20))
    unit = WorkUnit.objects.get(job=job)
    copy = WorkUnit.objects.create(job=job, index=unit.index, payload=unit.payload, known_answer_of=unit)
    device = make_device(contributor)
    result = Result.objects.create(unit=copy, job=job, state=Result.State.VALID, device=device.device,
                                   owner=contributor, reported_at=timezone.now())
    verification_budget(VERIFICATION_PRICE)

    earning = result_credit(result_id=result.pk)

    assert (earning.source, earning.net) == (Earning.Source.PLATFORM, VERIFICATION_PRICE)  # never 10**20
    assert escrow(job) == CAP * 10**20  # the submitter pays nothing for it
    assert balance(account_get(K.PLATFORM_VERIFICATION)) == 0


def test_a_disputed_known_answers_second_row_is_never_paid(submit_job, make_device, contributor, verification_budget):
    job = submit_job(rows=4, rows_per_unit=4)
    unit = WorkUnit.objects.get(job=job)
    copy = WorkUnit.objects.create(job=job, index=unit.index, payload=unit.payload, known_answer_of=unit)
    device = make_device(contributor)
    mirror = Result.objects.create(unit=unit, job=job, state=Result.State.VALID, device=device.device,
                                   owner=contributor, reported_at=timezone.now(), disputes_known_answer=copy)

    assert result_credit(result_id=mirror.pk) is None
    assert earnings_sync()["credited"] == 0
    assert not Earning.objects.exists()
