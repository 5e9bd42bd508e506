"""The admin lists endpoints, events and deliveries with their attempts, and never shows a secret."""

from __future__ import annotations

import pytest

from marketplace.webhooks import catalog
from marketplace.webhooks.delivery import delivery_attempt
from marketplace.webhooks.models import Delivery
from marketplace.webhooks.services import event_emit


@pytest.fixture
def staff(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("admin", "admin@example.org", "pw"))
    return client


def test_the_admin_shows_deliveries_and_attempts_but_no_secret(staff, register, submitter, receiver):
    endpoint = register()
    receiver.answer(503)
    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})
    delivery = Delivery.objects.get()
    delivery_attempt(delivery_id=delivery.pk)

    for model in ("endpoint", "event", "delivery"):
        assert staff.get(f"/admin/webhooks/{model}/").status_code == 200, model
    page = staff.get(f"/admin/webhooks/endpoint/{endpoint.pk}/change/")
    assert page.status_code == 200 and endpoint.secret.encode() not in page.content
    assert b"http_error" in staff.get(f"/admin/webhooks/delivery/{delivery.pk}/change/").content
