"""Adaptive replication: trust earned by consecutive valid replicated results, audits, known-answer units,
bans that re-verify what the banned device vouched for, and collusion found by that re-verification."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge
from marketplace.ledger.grants import verification_budget_fund
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits.leasing import leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate

KIND = "inference"


@pytest.fixture(autouse=True)
def small_threshold(settings):
    settings.IDLEGRID_TRUST_THRESHOLD = 2
    settings.IDLEGRID_AUDIT_RATE = 0.0
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0.0
    return settings



@pytest.fixture
def adaptive_job(submit_job):
    def make(units=1):
        return submit_job(rows=4 * units, rows_per_unit=4, adaptive=True)

    return make


def lease_one(enrolled):
    (lease,) = workunit_lease(device=enrolled.device, max_units=1)
    return lease


def compute(enrolled, report, wrong=None):
    """The device leases a unit and reports; with `wrong`, a plausible wrong output (the honest one + 1)."""
    lease = lease_one(enrolled)
    y = None
    if wrong is not None:
        y = wrong(WorkUnit.objects.get(pk=lease.unit_id)) + 1.0
    report(enrolled, lease.result_id, y)
    return lease


def drain(devices, report):
    """Each device leases and honestly computes whatever it can, then every unit is validated."""
    for enrolled in devices:
        for lease in workunit_lease(device=enrolled.device, max_units=64):
            report(enrolled, lease.result_id)
    for unit in WorkUnit.objects.filter(need_validate=True):
        unit_validate(unit_id=unit.pk)


def make_trusted(enrolled, helper, adaptive_job, report):
    """Earn trust: threshold (2) units, each replicated and confirmed by `helper` of another owner."""
    for _ in range(2):
        adaptive_job()
        first = compute(enrolled, report)
        compute(helper, report)
        assert unit_validate(unit_id=first.unit_id) == "done"
    assert DeviceTrust.objects.get(device=enrolled.device).trusted


def already_trusted(make_device, person):
    """A device with a trusted record (as if it had earned it), so that its word can convict others."""
    enrolled = make_device(person)
    DeviceTrust.objects.create(device=enrolled.device, kind=KIND, hardware_class=enrolled.device.hardware_class,
                               consecutive_valid=2, trusted_since=timezone.now())
    return enrolled


def test_a_new_device_has_every_unit_replicated(adaptive_job, make_device, people):
    job = adaptive_job()
    newcomer = make_device(people[0])

    lease = lease_one(newcomer)

    unit = WorkUnit.objects.get(pk=lease.unit_id)
    assert unit.replication_decided and unit.quorum == 2 and not unit.audit
    assert unit.results.count() == 2
    assert Result.objects.filter(job=job, state=Result.State.UNSENT).count() == 1


def test_a_device_is_trusted_after_enough_consecutive_valid_replicated_results(adaptive_job, make_device, people,
                                                                                report):
    alice, bob = make_device(people[0]), make_device(people[1])

    make_trusted(alice, bob, adaptive_job, report)

    trust = DeviceTrust.objects.get(device=alice.device, kind=KIND)
    assert trust.consecutive_valid == 2 and trust.trusted_since is not None
    assert trust.hardware_class == alice.device.hardware_class


def test_a_trusted_devices_unit_is_accepted_on_its_word_alone(adaptive_job, make_device, people, report):
    alice, bob = make_device(people[0]), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)
    job = adaptive_job()

    lease = compute(alice, report)

    assert unit_validate(unit_id=lease.unit_id) == "done"
    unit = WorkUnit.objects.get(pk=lease.unit_id)
    assert unit.quorum == 1 and unit.results.count() == 1
    assert unit.canonical_result.accepted_alone
    job_merge(job_id=job.pk)
    assert Job.objects.get(pk=job.pk).state == Job.State.COMPLETED


def test_an_audit_replicates_a_trusted_devices_unit_and_a_right_answer_passes_it(adaptive_job, make_device,
                                                                                   people, report, settings):
    alice, bob = make_device(people[0]), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)
    settings.IDLEGRID_AUDIT_RATE = 1.0
    adaptive_job()

    lease = compute(alice, report)
    compute(bob, report)

    assert unit_validate(unit_id=lease.unit_id) == "done"
    unit = WorkUnit.objects.get(pk=lease.unit_id)
    assert unit.audit and unit.quorum == 2
    assert alice.refresh().audits_passed == 1
    assert not unit.canonical_result.accepted_alone


def test_a_failed_audit_bans_the_device_and_re_verifies_what_it_vouched_for(adaptive_job, make_device, people,
                                                                              report, honest_output, settings):
    cheat, bob, carol = make_device(people[0]), make_device(people[1]), make_device(people[2])
    make_trusted(cheat, bob, adaptive_job, report)
    accepted_job = adaptive_job()
    alone = compute(cheat, report, wrong=honest_output)  # a wrong answer accepted on its word
    unit_validate(unit_id=alone.unit_id)
    job_merge(job_id=accepted_job.pk)
    assert Job.objects.get(pk=accepted_job.pk).state == Job.State.COMPLETED
    settings.IDLEGRID_AUDIT_RATE = 1.0
    adaptive_job()

    audited = compute(cheat, report, wrong=honest_output)
    compute(bob, report)
    unit_validate(unit_id=audited.unit_id)
    compute(carol, report)
    assert unit_validate(unit_id=audited.unit_id) == "done"

    banned = cheat.refresh()
    assert banned.state == Device.State.BANNED and banned.earnings_held and banned.audits_failed == 1
    assert "audit" in banned.ban_reason
    reopened = WorkUnit.objects.get(pk=alone.unit_id)
    assert reopened.state == WorkUnit.State.PENDING and reopened.quorum == 2
    assert Result.objects.get(pk=alone.result_id).state == Result.State.INVALID
    assert reopened.results.filter(state=Result.State.UNSENT).count() == 2
    job = Job.objects.get(pk=accepted_job.pk)
    assert job.state == Job.State.RUNNING and job.corrections == 1


def test_the_reopened_job_is_merged_again_with_the_right_answer(adaptive_job, make_device, people, report,
                                                                honest_output, settings):
    cheat, bob, carol = make_device(people[0]), make_device(people[1]), make_device(people[2])
    make_trusted(cheat, bob, adaptive_job, report)
    job = adaptive_job()
    alone = compute(cheat, report, wrong=honest_output)
    unit_validate(unit_id=alone.unit_id)
    job_merge(job_id=job.pk)
    wrong_output = Job.objects.get(pk=job.pk).output_id

    from marketplace.workunits.reverify import device_ban

    device_ban(device_id=cheat.pk, reason="caught elsewhere")
    drain([bob, carol], report)  # every unit the cheat vouched for is computed again by others
    job_merge(job_id=job.pk)

    corrected = Job.objects.get(pk=job.pk)
    assert corrected.state == Job.State.COMPLETED and corrected.output_id != wrong_output
    assert WorkUnit.objects.get(pk=alone.unit_id).canonical_result.device_id in {bob.pk, carol.pk}


def test_colluders_who_agreed_on_a_wrong_answer_are_both_banned_once_one_is_caught(adaptive_job, make_device,
                                                                                  people, report, honest_output):
    mallory, trudy = make_device(people[0]), make_device(people[1])
    bob, carol = already_trusted(make_device, people[2]), make_device(people[3])
    job = adaptive_job()
    first = compute(mallory, report, wrong=honest_output)
    compute(trudy, report, wrong=honest_output)  # the same wrong answer from another owner
    assert unit_validate(unit_id=first.unit_id) == "done"

    from marketplace.workunits.reverify import device_ban

    device_ban(device_id=mallory.pk, reason="caught by a known-answer unit")
    compute(bob, report)
    unit_validate(unit_id=first.unit_id)
    compute(carol, report)
    assert unit_validate(unit_id=first.unit_id) == "done"

    assert trudy.refresh().state == Device.State.BANNED
    assert "overturned" in trudy.device.ban_reason
    unit = WorkUnit.objects.get(pk=first.unit_id)
    assert unit.canonical_result.device_id in {bob.pk, carol.pk}
    assert Job.objects.get(pk=job.pk).corrections == 1


def test_a_device_outvoted_by_devices_none_of_which_is_trusted_is_not_banned(adaptive_job, make_device, people,
                                                                             report, honest_output, settings):
    alice, bob = make_device(people[0]), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)
    mallory, trudy = make_device(people[2]), make_device(people[3])
    settings.IDLEGRID_AUDIT_RATE = 1.0
    adaptive_job()

    audited = compute(alice, report)
    compute(mallory, report, wrong=honest_output)
    unit_validate(unit_id=audited.unit_id)
    compute(trudy, report, wrong=honest_output)  # two owners agree on the same wrong answer
    assert unit_validate(unit_id=audited.unit_id) == "done"

    assert alice.refresh().state == Device.State.ACTIVE  # their word alone convicts no one
    assert not DeviceTrust.objects.get(device=alice.device).trusted
    assert Result.objects.get(pk=audited.result_id).state == Result.State.INVALID


def test_an_invalid_result_sends_a_trusted_device_back_to_probation(adaptive_job, make_device, people, report,
                                                                   honest_output):
    alice, bob, carol = make_device(people[0]), make_device(people[1]), make_device(people[2])
    for _ in range(1):
        adaptive_job()
        first = compute(alice, report)
        compute(bob, report)
        unit_validate(unit_id=first.unit_id)
    adaptive_job()
    wrong = compute(alice, report, wrong=honest_output)
    compute(bob, report)
    unit_validate(unit_id=wrong.unit_id)
    compute(carol, report)
    unit_validate(unit_id=wrong.unit_id)

    trust = DeviceTrust.objects.get(device=alice.device)
    assert trust.consecutive_valid == 0 and not trust.trusted
    assert alice.refresh().state == Device.State.ACTIVE  # not an audit: no ban


def test_an_expired_lease_sends_a_trusted_device_back_to_probation(adaptive_job, make_device, people, report):
    alice, bob = make_device(people[0]), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)
    adaptive_job()
    lease = lease_one(alice)
    Result.objects.filter(pk=lease.result_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    leases_expire()

    assert not DeviceTrust.objects.get(device=alice.device).trusted
    unit = WorkUnit.objects.get(pk=lease.unit_id)
    assert unit.results.filter(state=Result.State.UNSENT).count() == 1


def test_a_unit_left_to_a_device_that_lost_its_trust_is_replicated_after_all(adaptive_job, make_device, people,
                                                                              report):
    alice, bob = make_device(people[0]), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)
    adaptive_job()
    lease = compute(alice, report)
    DeviceTrust.objects.filter(device=alice.device).update(trusted_since=None)

    assert unit_validate(unit_id=lease.unit_id) == "pending"

    unit = WorkUnit.objects.get(pk=lease.unit_id)
    assert unit.quorum == 2 and unit.results.filter(state=Result.State.UNSENT).count() == 1


def test_a_device_on_probation_gets_known_answer_units(adaptive_job, make_device, people, report, settings,
                                                      verification_budget):
    alice, bob, newcomer = make_device(people[0]), make_device(people[1]), make_device(people[2])
    adaptive_job()
    first = compute(alice, report)
    compute(bob, report)
    unit_validate(unit_id=first.unit_id)
    adaptive_job()
    verification_budget()
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0

    leases = workunit_lease(device=newcomer.device, max_units=1)

    assert len(leases) == 1  # inside its quota of one: the copy takes the ordinary unit's place
    copy = WorkUnit.objects.get(pk=leases[0].unit_id)
    assert copy.known_answer_of_id == first.unit_id
    assert leases[0].payload == WorkUnit.objects.get(pk=first.unit_id).payload
    report(newcomer, leases[0].result_id)
    assert unit_validate(unit_id=copy.pk) == "done"
    assert newcomer.refresh().audits_passed == 1
    assert DeviceTrust.objects.get(device=newcomer.device).consecutive_valid == 1


def known_answer_of_a_decided_unit(adaptive_job, make_device, people, report, settings, *, wrong=None):
    """Two owners decide a unit (agreeing on `wrong` answers if given); a third device on probation then
    leases and is handed a known-answer copy of it. Returns (job, original lease, copy lease, newcomer)."""
    first_owner, second_owner, newcomer = make_device(people[0]), make_device(people[1]), make_device(people[2])
    job = adaptive_job()
    first = compute(first_owner, report, wrong=wrong)
    compute(second_owner, report, wrong=wrong)
    assert unit_validate(unit_id=first.unit_id) == "done"
    adaptive_job()
    verification_budget_fund(amount=10**21, actor="tests", reason="known answers", idempotency_key="known-answer-test")
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0
    (lease,) = workunit_lease(device=newcomer.device, max_units=1)
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0.0
    assert WorkUnit.objects.get(pk=lease.unit_id).known_answer_of_id == first.unit_id
    return job, first, lease, (first_owner, second_owner, newcomer)


def test_a_wrong_answer_to_a_known_answer_unit_bans_the_device(adaptive_job, make_device, people, report,
                                                               honest_output, settings):
    job, original, copy, (alice, bob, cheat) = known_answer_of_a_decided_unit(
        adaptive_job, make_device, people, report, settings)

    report(cheat, copy.result_id, honest_output(WorkUnit.objects.get(pk=copy.unit_id)) + 1.0)
    assert unit_validate(unit_id=copy.unit_id) == "disputed"
    disputed = WorkUnit.objects.get(pk=original.unit_id)
    assert disputed.state == WorkUnit.State.PENDING and disputed.quorum == 3  # one owner more than vouched
    drain([already_trusted(make_device, people[3]), make_device(people[4])], report)

    assert cheat.refresh().state == Device.State.BANNED
    assert "known-answer" in cheat.device.ban_reason
    assert WorkUnit.objects.get(pk=copy.unit_id).state == WorkUnit.State.ERROR
    assert WorkUnit.objects.get(pk=original.unit_id).state == WorkUnit.State.DONE
    assert {alice.refresh().state, bob.refresh().state} == {Device.State.ACTIVE}
    assert Job.objects.get(pk=job.pk).units_total == 1  # the copy is no unit of the job


def test_an_honest_device_disputing_a_known_answer_colluders_made_has_them_banned(adaptive_job, make_device, people,
                                                                                  report, honest_output, settings):
    job, original, copy, (mallory, trudy, honest) = known_answer_of_a_decided_unit(
        adaptive_job, make_device, people, report, settings, wrong=honest_output)

    report(honest, copy.result_id)  # the right answer, which differs from the colluders' "known" one
    assert unit_validate(unit_id=copy.unit_id) == "disputed"
    drain([already_trusted(make_device, people[3]), make_device(people[4])], report)

    assert {mallory.refresh().state, trudy.refresh().state} == {Device.State.BANNED}
    assert honest.refresh().state == Device.State.ACTIVE and honest.device.audits_passed == 1
    assert WorkUnit.objects.get(pk=copy.unit_id).state == WorkUnit.State.DONE
    corrected = WorkUnit.objects.get(pk=original.unit_id)
    assert corrected.canonical_result.device.owner_id not in {mallory.owner.pk, trudy.owner.pk}
    assert Job.objects.get(pk=job.pk).corrections == 1


def test_a_device_that_won_a_dispute_can_still_be_banned(adaptive_job, make_device, people, report,
                                                          honest_output, settings):
    _, _, copy, (_, _, challenger) = known_answer_of_a_decided_unit(
        adaptive_job, make_device, people, report, settings, wrong=honest_output)
    report(challenger, copy.result_id)
    unit_validate(unit_id=copy.unit_id)
    drain([already_trusted(make_device, people[3]), make_device(people[4])], report)
    assert Result.objects.filter(device=challenger.device, state=Result.State.VALID).count() == 2  # copy + original
    assert challenger.refresh().valid_results == 1  # one computation, counted once (on the copy)

    from marketplace.workunits.reverify import device_ban

    assert device_ban(device_id=challenger.pk, reason="caught elsewhere")

    banned = challenger.refresh()
    assert banned.state == Device.State.BANNED and banned.valid_results == 0


def test_a_banned_device_can_no_longer_use_the_api(make_device, people):
    cheat = make_device(people[0])
    from marketplace.workunits.reverify import device_ban

    device_ban(device_id=cheat.pk, reason="test")

    response = cheat.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json")
    assert response.status_code == 401


def test_devices_show_their_trust_and_audits_through_the_api(adaptive_job, make_device, people, report, api):
    alice, bob = make_device(people[0], name="alice-laptop"), make_device(people[1])
    make_trusted(alice, bob, adaptive_job, report)

    (device,) = api(people[0]).get("/api/v1/devices/").json()["results"]

    assert device["name"] == "alice-laptop" and device["state"] == "active"
    assert device["trust"] == [{"kind": KIND, "hardware_class": alice.device.hardware_class, "state": "trusted",
                                "consecutive_valid": 2, "trusted_since": device["trust"][0]["trusted_since"]}]
    assert device["trust"][0]["trusted_since"] is not None
    assert (device["audits_passed"], device["audits_failed"], device["earnings_held"]) == (0, 0, False)


def test_enrolment_tokens_are_rate_limited_per_account(api, people, settings):
    settings.IDLEGRID_ENROLLMENTS_PER_HOUR = 2
    client = api(people[0])

    answers = [client.post("/api/v1/enrollment-tokens/").status_code for _ in range(3)]

    assert answers == [201, 201, 429]
    assert client.post("/api/v1/enrollment-tokens/").json()["error"]["code"] == "throttled"
    assert api(people[1]).post("/api/v1/enrollment-tokens/").status_code == 201
