"""Portal fixtures: a signed-in person's test client, and units computed through the real lease, report
and validate services (so devices, earnings and proofs are what production would show)."""

from __future__ import annotations

import pytest

from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate


@pytest.fixture(autouse=True)
def no_known_answers(settings):
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0


@pytest.fixture
def signed_in(client):
    """signed_in(user): the test client, logged in as that person."""

    def login(user):
        client.force_login(user)
        return client

    return login


@pytest.fixture
def compute_unit(make_device, report, contributor, other_contributor, django_capture_on_commit_callbacks):
    """compute_unit(unit, devices=None): devices (default: one each of contributor and other_contributor)
    lease the unit, report honestly, and it is validated, its credits run as after commit."""

    def run(unit: WorkUnit, devices=None):
        devices = devices or [make_device(contributor, name="mine"), make_device(other_contributor, name="theirs")]
        for device in devices:
            workunit_lease(device=device.device, max_units=10)
            leased = Result.objects.get(unit=unit, device=device.device, state=Result.State.IN_PROGRESS)
            report(device, leased)
        with django_capture_on_commit_callbacks(execute=True):
            assert unit_validate(unit_id=unit.pk) == "done"
        return devices

    return run
