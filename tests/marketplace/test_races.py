"""Races closed, each side in its own thread and database connection, interleaved on purpose.

On PostgreSQL (CI) the two sides really run at once and the row locks decide; on SQLite (the embedded
default) IMMEDIATE transactions serialise writers, so the same interleaving degenerates to one side after
the other, and the invariants checked here must hold there too."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connections, transaction

from marketplace.ledger import earnings as ledger_earnings
from marketplace.ledger.models import Account, Earning, Posting
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import ledger_check
from marketplace.workers.models import Device
from marketplace.workunits import verification
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.reverify import device_ban

pytestmark = pytest.mark.django_db(transaction=True)


class Side(threading.Thread):
    """One side of a race: runs `work` on its own connection, keeps what it raised."""

    def __init__(self, work):
        super().__init__(daemon=True)
        self.work, self.error, self.value = work, None, None

    def run(self):
        try:
            self.value = self.work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            connections.close_all()


def both(first: Side, second: Side, timeout: float = 60) -> None:
    first.start()
    second.start()
    for side in (first, second):
        side.join(timeout)
        assert not side.is_alive(), "a side of the race never finished (a deadlock?)"
    for side in (first, second):
        if side.error is not None:
            raise side.error


@pytest.fixture
def decided_inputs(submit_job, make_device, report, contributor, cheater):
    """A unit with two honest-looking reports (one by a device about to be banned), not yet validated."""
    job = submit_job(rows=4, rows_per_unit=4)
    unit = WorkUnit.objects.get(job=job)
    soon_banned, honest = make_device(cheater), make_device(contributor)
    for device in (soon_banned, honest):
        (lease,) = workunit_lease(device=device.device, max_units=1)
        report(device, lease.result_id)
    return unit, soon_banned, honest


def test_a_report_of_a_device_banned_during_validation_never_counts_in_the_quorum(decided_inputs, monkeypatch):
    # Before: validation read the banned device's report, the ban moved it to invalid meanwhile, and the
    # validation still counted it: the unit was decided by one owner's answer, the other's "valid" row
    # being invalid in the database.
    unit, soon_banned, honest = decided_inputs
    in_validation, ban_done = threading.Event(), threading.Event()
    group = verification._group

    def group_then_let_the_ban_run(*args, **kwargs):
        in_validation.set()
        ban_done.wait(3)  # with the row locks, the ban waits for this validation: give up waiting after 3 s
        return group(*args, **kwargs)

    monkeypatch.setattr(verification, "_group", group_then_let_the_ban_run)

    def ban():
        assert in_validation.wait(30)
        with transaction.atomic():
            device_ban(device_id=soon_banned.pk, reason="caught elsewhere")
        ban_done.set()

    both(Side(lambda: verification.unit_validate(unit_id=unit.pk)), Side(ban))

    unit.refresh_from_db()
    valid = Result.objects.filter(unit=unit, state=Result.State.VALID)
    assert not valid.filter(device__state=Device.State.BANNED).exists()
    if unit.state == WorkUnit.State.DONE:
        assert valid.values("owner_id").distinct().count() >= unit.quorum
        assert unit.canonical_result.state == Result.State.VALID
    else:  # the ban withdrew the report after the decision: the unit is re-decided by other owners
        assert unit.state == WorkUnit.State.PENDING
        assert Result.objects.filter(unit=unit, state=Result.State.UNSENT).exists()
    assert Device.objects.get(pk=soon_banned.pk).state == Device.State.BANNED


@pytest.fixture
def held_earning(decided_inputs, django_capture_on_commit_callbacks):
    unit, soon_banned, honest = decided_inputs
    with django_capture_on_commit_callbacks(execute=True):
        assert verification.unit_validate(unit_id=unit.pk) == "done"
    earning = Earning.objects.get(device=soon_banned.device)
    assert earning.state == Earning.State.HELD
    # As a ban leaves it: the device banned, its result withdrawn (both reversal and forfeit apply).
    Device.objects.filter(pk=soon_banned.pk).update(state=Device.State.BANNED)
    Result.objects.filter(pk=earning.result_id).update(state=Result.State.INVALID)
    return earning


def test_a_reversal_and_a_forfeit_of_one_earning_move_its_money_once(held_earning, monkeypatch):
    # Before: both read the earning as held without a lock, both posted (a reversal and a forfeit have
    # different keys), and the loser's conditional update failed without rolling its posting back: the
    # device's held account went negative.
    write = ledger_earnings.posting_write
    inside = threading.Event()

    def slow_first_write(**kwargs):
        if not inside.is_set():
            inside.set()
            time.sleep(1.0)  # the other side starts now, while this one holds the earning
        return write(**kwargs)

    monkeypatch.setattr(ledger_earnings, "posting_write", slow_first_write)

    def forfeit():
        assert inside.wait(30)
        return ledger_earnings.earning_forfeit(earning_id=held_earning.pk, reason="banned")

    reverse = Side(lambda: ledger_earnings.earning_reverse(earning_id=held_earning.pk, reason="withdrawn"))
    other = Side(forfeit)
    both(reverse, other)

    assert sorted([reverse.value, other.value]) == [False, True]
    closing = Posting.objects.filter(idempotency_key__in=[f"reversal:result={held_earning.result_id}",
                                                          f"forfeit:result={held_earning.result_id}"])
    assert closing.count() == 1
    earning = Earning.objects.get(pk=held_earning.pk)
    assert earning.state in (Earning.State.REVERSED, Earning.State.FORFEITED)
    assert earning.closed_by_id == closing.get().pk
    assert balance(account_get(Account.Kind.CONTRIBUTOR_HELD, device_id=earning.device_id)) == 0
    assert ledger_check() == []


def test_a_forfeit_whose_state_move_loses_rolls_its_posting_back(held_earning, monkeypatch):
    # Whatever closes the earning between its read and its state move (here: a settlement slipped in by
    # hand), the posting that moved the money is rolled back with it, never left behind.
    write = ledger_earnings.posting_write

    def write_then_close_elsewhere(**kwargs):
        posting = write(**kwargs)
        Earning.objects.filter(pk=held_earning.pk).update(state=Earning.State.SETTLED)
        return posting

    monkeypatch.setattr(ledger_earnings, "posting_write", write_then_close_elsewhere)

    with pytest.raises(RuntimeError, match="changed while it was being closed"):
        ledger_earnings.earning_forfeit(earning_id=held_earning.pk, reason="banned")

    assert not Posting.objects.filter(idempotency_key=f"forfeit:result={held_earning.result_id}").exists()
    assert Earning.objects.get(pk=held_earning.pk).state == Earning.State.HELD
