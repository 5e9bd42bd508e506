"""The landing page and its figures (anyone may read them), and how amounts and times are written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.network import network_figures
from marketplace.portal.templatetags.portal import seconds, tokens, tokens_text, when
from marketplace.workers.models import Device
from marketplace.workunits.models import WorkUnit

pytestmark = pytest.mark.django_db


def test_tokens_text_writes_base_units_as_tokens_with_separators_and_says_when_digits_were_cut():
    assert tokens_text(0) == "0"
    assert tokens_text(10**18) == "1"
    assert tokens_text(1_234_500 * 10**18) == "1,234,500"
    assert tokens_text(15 * 10**17) == "1.5"
    assert tokens_text(950_000_000_000_000) == "0.00095"
    assert tokens_text(1) == "~0"  # one base unit: less than the six decimals shown
    assert tokens_text(-25 * 10**16) == "-0.25"
    assert tokens_text(1234, decimals=0) == "1,234"


def test_tokens_filter_keeps_the_exact_base_units_in_the_hover_text():
    html = tokens("950000000000000")
    assert 'title="950,000,000,000,000 base units"' in html
    assert ">0.00095 IGT<" in html
    assert tokens(None) == '<span class="amount">—</span>'


def test_when_writes_a_time_element_in_utc_for_the_browser_to_show_in_the_viewers_zone():
    html = when(datetime(2026, 12, 3, 15, 4, tzinfo=UTC) + timedelta(hours=0))
    assert html == '<time datetime="2026-12-03T15:04:00Z" data-local>2026-12-03 15:04 UTC</time>'
    assert "never" in when(None)


def test_seconds_reads_like_a_duration():
    assert [seconds(v) for v in (None, 0, 12.4, 200, 3725)] == ["—", "0 s", "12 s", "3 min 20 s", "1 h 2 min"]


def test_network_figures_count_what_happened(submit_job, make_device, contributor, other_contributor):
    now = timezone.now()
    online = make_device(contributor).device
    asleep = make_device(other_contributor, name="asleep").device
    Device.objects.filter(pk=online.pk).update(last_seen_at=now)
    Device.objects.filter(pk=asleep.pk).update(last_seen_at=now - timedelta(hours=1))
    job = submit_job(rows=20, rows_per_unit=10)
    from marketplace.jobs.services import job_split

    job_split(job_id=job.pk)
    WorkUnit.objects.filter(job=job, index=0).update(state=WorkUnit.State.DONE, finished_at=now)

    figures = network_figures(now=now)
    assert figures["devices_online"] == 1 and figures["owners_online"] == 1
    assert figures["units_validated_today"] == 1
    assert figures["jobs_running"] == 1 and figures["jobs_completed"] == 0
    assert figures["results_per_unit"] == 0.0  # one unit decided, no computed result recorded for it
    assert figures["tokens_paid"] == 0


def test_the_landing_page_shows_the_figures_to_anyone_and_polls_them(client):
    page = client.get("/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Devices online" in html and "Units validated today" in html and "Paid to contributors" in html
    assert 'hx-get="/network/figures/"' in html
    assert 'href="/accounts/signup/"' in html
    fragment = client.get("/network/figures/")
    assert fragment.status_code == 200 and b"<html" not in fragment.content


def test_the_figures_are_cached_between_polls(client, django_assert_num_queries):
    client.get("/network/figures/")
    with django_assert_num_queries(0):
        assert client.get("/network/figures/").status_code == 200


def test_a_person_who_is_signed_in_goes_home_to_their_jobs(client, submitter):
    client.force_login(submitter)
    assert client.get("/home/").headers["Location"] == "/jobs/"
    assert client.get("/").status_code == 200


def test_the_vendored_scripts_are_served_from_static_not_a_cdn(client):
    html = client.get("/").content.decode()
    assert '/static/portal/vendor/htmx.min.js' in html and "/static/portal/vendor/uPlot.iife.min.js" in html
    assert "http://" not in html.split("<body")[0] and "https://" not in html.split("<body")[0]


def test_an_unknown_page_answers_the_portals_404_and_the_api_keeps_its_json(client):
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and b"There is nothing here" in page.content and b"portal.css" in page.content
    api = client.get("/api/v1/no-such-endpoint/")
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"
