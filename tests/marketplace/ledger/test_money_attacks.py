"""Money that cannot be minted: the attacks of the hardening issue, each as it was run before, now ending
with the platform paying at most its budget and the ledger's invariants holding (conftest.ledger_sound)."""


from marketplace.ledger.models import Account, Earning
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import verification_budget_available
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit

K = Account.Kind
VERIFICATION_PRICE = 10**15



def platform_spent() -> int:
    """What the platform paid out of its verification budget: budget funded minus what it still holds."""
    from marketplace.ledger.models import Line, Posting

    funded = sum(line.amount for line in Line.objects.filter(
        posting__kind=Posting.Kind.BUDGET, account__kind=K.PLATFORM_VERIFICATION))
    return funded - balance(account_get(K.PLATFORM_VERIFICATION))


def test_attack_a_quorum_of_ten_is_paid_from_its_own_escrow(submit_job, make_device, people, compute_unit):
    # Before: a quorum-10 job escrowed 2 x price, and the platform paid 7.6 x price more at the job's price.
    price = 10**20
    job = submit_job(rows=4, rows_per_unit=4, quorum=10, max_results_per_unit=10, price_per_result=str(price))
    unit = WorkUnit.objects.get(job=job)

    compute_unit(unit, devices=[make_device(person) for person in people[:10]])

    assert Earning.objects.filter(source=Earning.Source.ESCROW).count() == 10
    assert not Earning.objects.exclude(source=Earning.Source.ESCROW).exists()
    assert platform_spent() == 0
    assert balance(account_get(K.JOB_ESCROW, job_id=job.pk)) == 0  # 10 escrowed, 10 paid


def test_attack_known_answer_copies_of_an_expensive_unit_pay_the_reference_price_a_bounded_number_of_times(
    submit_job, make_device, people, report, validate, settings, verification_budget, django_user_model
):
    # Before: an attacker ran a 1-unit job at price 10**30, decided it with two of its own accounts, then
    # leased a free job's units from a third account's device at the known-answer rate and answered copies
    # of its own expensive unit with bytes it already had: 14 copies, 13.3 x 10**30 minted by the platform.
    from marketplace.ledger.grants import balance_grant

    attacker = django_user_model.objects.create_user("attacker")
    balance_grant(user=attacker, amount=10**31, actor="tests", reason="a rich attacker", idempotency_key="attacker")
    expensive_job = submit_job(owner=attacker, rows=4, rows_per_unit=4, price_per_result=str(10**30))
    expensive = WorkUnit.objects.get(job=expensive_job)
    accomplices = [make_device(people[0]), make_device(people[1])]
    for device in accomplices:
        (lease,) = workunit_lease(device=device.device, max_units=1)
        report(device, lease.result_id)
    assert validate(expensive) == "done"
    submit_job(rows=400, rows_per_unit=4, price_per_result=0)  # a free job: the attacker's excuse to lease
    budget = 1000 * VERIFICATION_PRICE
    verification_budget(budget)
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0  # the attacker's best case: every place could be a copy
    fourth = make_device(people[2])

    copies_answered = 0
    for _ in range(100):
        for lease in workunit_lease(device=fourth.device, max_units=1):
            unit = WorkUnit.objects.get(pk=lease.unit_id)
            if unit.known_answer_of_id == expensive.pk:
                copies_answered += 1
            report(fourth, lease.result_id)  # the bytes it knows, honest here: the copy is right
            validate(unit)

    assert WorkUnit.objects.get(pk=expensive.pk).known_answer_copies <= settings.IDLEGRID_KNOWN_ANSWER_MAX_COPIES == 3
    assert 1 <= copies_answered <= 3
    copy_pay = Earning.objects.filter(result__unit__known_answer_of=expensive)
    assert copy_pay.count() == copies_answered
    assert set(copy_pay.values_list("gross", flat=True)) == {VERIFICATION_PRICE}  # never 10**30
    assert platform_spent() <= budget
    assert platform_spent() == VERIFICATION_PRICE * Earning.objects.filter(source=Earning.Source.PLATFORM).count()


def test_known_answers_are_made_only_while_the_budget_can_pay_for_every_copy_out(
    submit_job, make_device, people, report, validate, settings, verification_budget
):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0
    for index in range(3):  # three units decided by two owners: sources for copies
        job = submit_job(rows=4, rows_per_unit=4)
        for device in (make_device(people[0], name=f"a{index}"), make_device(people[1], name=f"b{index}")):
            settings.IDLEGRID_KNOWN_ANSWER_RATE = 0
            (lease,) = workunit_lease(device=device.device, max_units=1)
            report(device, lease.result_id)
        validate(WorkUnit.objects.get(job=job))
    submit_job(rows=40, rows_per_unit=4)
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0

    newcomer = make_device(people[2])
    assert not WorkUnit.objects.get(pk=workunit_lease(device=newcomer.device, max_units=1)[0].unit_id).known_answer_of_id

    verification_budget(2 * VERIFICATION_PRICE)  # enough for two copies
    copies = []
    for person in people[3:7]:
        (lease,) = workunit_lease(device=make_device(person).device, max_units=1)
        copies.append(WorkUnit.objects.get(pk=lease.unit_id).known_answer_of_id is not None)
    assert copies == [True, True, False, False]  # two out, none paid yet: the budget is committed
    assert verification_budget_available() == 2 * VERIFICATION_PRICE


def test_a_unit_decided_by_one_owners_devices_is_never_a_source(submit_job, make_device, people, settings,
                                                                verification_budget, report, validate):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0
    job = submit_job(rows=4, rows_per_unit=4)
    devices = [make_device(people[0]), make_device(people[1])]
    for device in devices:
        (lease,) = workunit_lease(device=device.device, max_units=1)
        report(device, lease.result_id)
    validate(WorkUnit.objects.get(job=job))
    submit_job(rows=8, rows_per_unit=4)
    verification_budget()
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0

    # A device of an owner who computed the unit gets no copy of it: it would only repeat its own answer.
    (lease,) = workunit_lease(device=make_device(people[0], name="second").device, max_units=1)

    assert WorkUnit.objects.get(pk=lease.unit_id).known_answer_of_id is None
    assert Result.objects.filter(unit__known_answer_of__isnull=False).count() == 0
