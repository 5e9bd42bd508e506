"""GET /api/v1/agent/earnings: what `idlegrid-agent status` shows of the money, for a device's owner."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.ledger.earnings import earning_reverse, earnings_settle
from marketplace.ledger.models import Earning

EARNINGS = "/api/v1/agent/earnings"


def test_it_answers_the_owner_s_held_and_settled_earnings_and_this_device_s_units_today(
    settings, submit_job, compute_unit, make_device, contributor, other_contributor, django_assert_max_num_queries,
):
    settings.IDLEGRID_TOKEN_SYMBOL, settings.IDLEGRID_TOKEN_DECIMALS = "TST", 6
    laptop, desktop, theirs = make_device(contributor), make_device(contributor, name="desktop"), make_device(other_contributor)
    compute_unit(submit_job(rows=4, rows_per_unit=4).units.get(), devices=[laptop, theirs])
    assert earnings_settle(now=timezone.now() + timedelta(days=3650)) is not None  # past its audit window
    compute_unit(submit_job(rows=4, rows_per_unit=4).units.get(), devices=[desktop, theirs])
    settled = Earning.objects.get(device=laptop.device)
    held = Earning.objects.get(device=desktop.device)
    assert (settled.state, held.state) == (Earning.State.SETTLED, Earning.State.HELD)

    with django_assert_max_num_queries(3):  # the device's authentication, the totals, the count
        answer = laptop.client().get(EARNINGS)

    assert answer.status_code == 200
    body = answer.json()
    assert body["held"] == str(int(held.net)) and body["settled"] == str(int(settled.net))  # the owner's, both devices
    assert int(held.net) > 0 and int(settled.net) > 0
    assert body["token_symbol"] == "TST" and body["token_decimals"] == 6
    assert body["units_validated_today"] == 1  # this device's: the desktop's unit is not counted
    assert theirs.client().get(EARNINGS).json()["units_validated_today"] == 2


def test_yesterday_s_units_and_withdrawn_ones_are_not_today_s(
    submit_job, compute_unit, make_device, contributor, other_contributor,
):
    device, theirs = make_device(contributor), make_device(other_contributor)
    compute_unit(submit_job(rows=4, rows_per_unit=4).units.get(), devices=[device, theirs])
    compute_unit(submit_job(rows=4, rows_per_unit=4).units.get(), devices=[device, theirs])
    older, newer = Earning.objects.filter(device=device.device).order_by("pk")
    Earning.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(days=2))
    assert earning_reverse(earning_id=newer.pk, reason="withdrawn in a test")

    body = device.client().get(EARNINGS).json()

    assert body["units_validated_today"] == 0
    assert body["held"] == str(int(older.net))  # the reversed one is no longer held either


def test_a_newcomer_has_nothing_yet(make_device, contributor):
    body = make_device(contributor).client().get(EARNINGS).json()
    assert (body["held"], body["settled"], body["units_validated_today"]) == ("0", "0", 0)


@pytest.mark.parametrize("authorization", [None, "Device 1:wrong", "Token abc"])
def test_it_needs_a_device(make_device, contributor, authorization):
    make_device(contributor)
    client = APIClient()
    if authorization:
        client.credentials(HTTP_AUTHORIZATION=authorization)
    assert client.get(EARNINGS).status_code in (401, 403)


def test_a_person_s_token_is_not_a_device(api, contributor):
    assert api(contributor).get(EARNINGS).status_code in (401, 403)


def test_the_endpoint_is_in_the_schema(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    operation = schema["paths"]["/api/v1/agent/earnings"]["get"]
    assert operation["operationId"] == "agent_earnings_retrieve"
    fields = schema["components"]["schemas"]["EarningsOut"]["properties"]
    assert {"held", "settled", "token_symbol", "token_decimals", "units_validated_today"} <= set(fields)
