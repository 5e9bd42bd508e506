"""The admin shows the ledger and never lets anyone change it by hand."""

import pytest
from ledgerkit import link_wallet, settled_earnings

from marketplace.ledger.epochs import epoch_close
from marketplace.ledger.models import Posting


@pytest.fixture
def staff_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("admin", "admin@example.org", "pw"))
    return client


@pytest.mark.parametrize("model", ["account", "posting", "auditentry", "epoch", "walletlink"])
def test_every_ledger_list_renders_read_only(staff_client, contributor, submit_job, model):
    submit_job(rows=4, rows_per_unit=4)
    link_wallet(contributor)
    settled_earnings(contributor, 5, key="admin-test")
    epoch_close()

    listing = staff_client.get(f"/admin/ledger/{model}/")

    assert listing.status_code == 200
    assert listing.context["cl"].result_count >= 1
    assert staff_client.get(f"/admin/ledger/{model}/add/").status_code == 403


def test_a_posting_page_shows_its_lines_and_cannot_be_deleted(staff_client, submit_job):
    submit_job(rows=4, rows_per_unit=4)
    posting = Posting.objects.get(kind=Posting.Kind.ESCROW)

    page = staff_client.get(f"/admin/ledger/posting/{posting.pk}/change/")

    assert page.status_code == 200
    assert b"job_escrow:job=" in page.content
    assert staff_client.post(f"/admin/ledger/posting/{posting.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Posting.objects.filter(pk=posting.pk).exists()
