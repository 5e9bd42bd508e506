"""The submitter's portal pages through Django's test client, on the real database and services: the
dashboard, the new-job form (errors next to their field, nothing changed on bad input), validation as you
type, uploads, the quote, the one-time confirm, the live job page, cancel, the output, funds and the
statement (and its CSV)."""

from __future__ import annotations

import csv
import io
import json
import re
from html import unescape

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifact_store
from marketplace.jobs.models import Job
from marketplace.ledger.deposits import deposit_credit
from marketplace.ledger.models import Posting
from marketplace.ledger.wallets import wallet_challenge_create, wallet_link
from marketplace.portal.views import submitter as views

MLP = {"in_features": 4, "hidden": [8], "out_features": 3}
PRICE_TOKENS = "0.001"  # 10**15 base units at 18 decimals


@pytest.fixture
def browser(submitter) -> Client:
    client = Client()
    client.force_login(submitter)
    return client


def _form(**changes) -> dict:
    data = {"kind": "inference", "architecture": "mlp", "config": json.dumps(MLP), "rows_per_unit": "4",
            "quorum": "2", "max_results_per_unit": "6", "compare_method": "allclose", "price": PRICE_TOKENS}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def _files(make_weights, make_dataset, *, rows: int = 10) -> dict:
    return {"weights_file": SimpleUploadedFile("w.safetensors", make_weights("mlp", MLP)),
            "dataset_file": SimpleUploadedFile("x.safetensors", make_dataset(rows, (4,)))}


def _quote(browser, make_weights, make_dataset, **changes):
    response = browser.post("/jobs/new/", {**_form(**changes), **_files(make_weights, make_dataset)})
    assert response.status_code == 200, response.content.decode()[:3000]
    token = re.search(r'name="token" value="([^"]+)"', response.content.decode())
    assert token, "the quote page has a confirm form"
    return response, token.group(1)


def _field_error(html: str, field: str) -> str:
    match = re.search(rf'id="id_{field}_status"[^>]*>(.*?)</div>', html, re.S)
    assert match, f"no status for {field}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


# --- dashboard ----------------------------------------------------------------------------------

def test_a_new_submitter_sees_an_empty_dashboard_that_says_what_to_do(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_user("newcomer"))

    html = client.get("/jobs/").content.decode()

    assert "No jobs yet" in html
    assert 'href="/funds/"' in html and 'href="/jobs/new/"' in html


def test_the_dashboard_lists_the_jobs_newest_first_a_page_at_a_time(browser, submit_job, monkeypatch):
    monkeypatch.setattr(views, "JOBS_PER_PAGE", 2)
    jobs = [submit_job(split=False) for _ in range(3)]

    first = browser.get("/jobs/").content.decode()
    second = browser.get("/jobs/?page=2").content.decode()

    assert [int(n) for n in re.findall(r'href="/jobs/(\d+)/"', first)] == [jobs[2].pk, jobs[1].pk]
    assert [int(n) for n in re.findall(r'href="/jobs/(\d+)/"', second)] == [jobs[0].pk]
    assert "Page 1 of 2" in first and "Escrowed" in first


# --- the new-job form ---------------------------------------------------------------------------

def test_every_input_of_the_new_job_form_has_a_label(browser):
    html = browser.get("/jobs/new/").content.decode()

    inputs = re.findall(r'<(?:input|select|textarea)[^>]*\bid="(id_[a-z_]+)"', html)
    hidden = set(re.findall(r'<input type="hidden"[^>]*id="(id_[a-z_]+)"', html))
    visible = [i for i in inputs if i not in hidden]
    assert len(visible) > 15
    for input_id in visible:
        assert f'for="{input_id}"' in html, f"{input_id} has no label"
    assert 'hx-post="/jobs/new/validate/"' in html


def test_a_config_that_is_not_json_is_refused_next_to_its_field_and_nothing_is_stored(browser, make_weights,
                                                                                        make_dataset):
    response = browser.post("/jobs/new/", {**_form(config="{in_features: 4"), **_files(make_weights, make_dataset)})

    assert response.status_code == 400
    html = response.content.decode()
    assert _field_error(html, "config").startswith("not JSON")
    assert _field_error(html, "weights_file").startswith("Not stored: the form had errors")
    assert Artifact.objects.count() == 0 and Job.objects.count() == 0


def test_a_spec_error_from_the_kind_is_shown_next_to_the_field_it_is_about(browser, make_weights, make_dataset):
    response = browser.post("/jobs/new/", {**_form(config=json.dumps({**MLP, "in_features": 5})),
                                           **_files(make_weights, make_dataset)})

    html = response.content.decode()
    assert response.status_code == 400
    assert "tensor names do not match" in _field_error(html, "weights_file") or "expected F32" in _field_error(
        html, "weights_file")
    assert "shape" in _field_error(html, "dataset_file")
    assert Job.objects.count() == 0 and not Posting.objects.filter(kind=Posting.Kind.ESCROW).exists()


def test_missing_files_are_asked_for_in_words(browser):
    response = browser.post("/jobs/new/", _form())

    html = response.content.decode()
    assert response.status_code == 400
    assert _field_error(html, "weights_file") == "Choose a file: Weights (safetensors)."
    assert _field_error(html, "dataset_file") == "Choose a file: Dataset (safetensors)."


def test_the_form_keeps_files_already_uploaded_by_their_sha256(browser, upload, submitter, make_weights, make_dataset):
    weights, dataset = upload(make_weights("mlp", MLP), submitter), upload(make_dataset(10, (4,)), submitter)

    response = browser.post("/jobs/new/", _form(weights=weights, dataset=dataset))

    assert response.status_code == 200
    assert "Quote: inference job" in response.content.decode()


def test_validation_as_you_type_answers_the_one_field_asked_about(browser):
    bad = browser.post("/jobs/new/validate/", {**_form(config='{"in_features": 0, "out_features": 3}'),
                                               "_field": "config"})
    good = browser.post("/jobs/new/validate/", {**_form(), "_field": "config"})
    quorum = browser.post("/jobs/new/validate/", {**_form(quorum="1"), "_field": "quorum"})
    unknown = browser.post("/jobs/new/validate/", {**_form(), "_field": "nonsense"})

    assert "config.in_features must be between 1" in bad.content.decode()
    assert "OK" in good.content.decode() and "field-error" not in good.content.decode()
    assert "greater than or equal to 2" in quorum.content.decode()
    assert unknown.status_code == 400


def test_the_upload_endpoint_stores_the_raw_bytes_as_the_persons_artifact(browser, submitter, make_weights):
    data = make_weights("mlp", MLP)

    response = browser.post("/jobs/new/upload/", data=data, content_type="application/octet-stream")

    assert response.status_code == 201
    sha = response.json()["sha256"]
    assert Artifact.objects.get(sha256=sha).owners.filter(pk=submitter.pk).exists()
    assert response.json()["size"] == len(data)


def test_an_upload_past_the_quota_is_refused_with_the_reason_and_stores_nothing(browser, settings):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 1024

    response = browser.post("/jobs/new/upload/", data=b"x" * 4096, content_type="application/octet-stream")

    assert response.status_code == 413
    assert "storage quota" in response.json()["error"]
    assert Artifact.objects.count() == 0


# --- quote and confirm --------------------------------------------------------------------------

def test_the_quote_shows_units_escrow_cost_eta_and_pool_and_creates_nothing(browser, make_weights, make_dataset):
    response, _ = _quote(browser, make_weights, make_dataset)

    html = response.content.decode()
    assert re.search(r"<dt>Units</dt><dd>3</dd>", html)  # 10 rows by 4
    assert 'title="18,000,000,000,000,000 base units"' in html  # escrow: 10**15 x 3 units x 6 results
    assert 'title="6,000,000,000,000,000 base units"' in html  # expected: the quorum, 2 per unit
    assert "units need results from devices of 2 different owners" in html  # no device: not runnable, no ETA
    assert "covers the escrow" in html
    assert Job.objects.count() == 0 and not Posting.objects.filter(kind=Posting.Kind.ESCROW).exists()


def test_a_quote_the_balance_does_not_cover_links_to_a_deposit_of_what_is_missing(django_user_model, upload,
                                                                                   make_weights, make_dataset):
    poor = django_user_model.objects.create_user("poor")
    client = Client()
    client.force_login(poor)

    response = client.post("/jobs/new/", {**_form(), **_files(make_weights, make_dataset)})

    html = response.content.decode()
    assert "does not cover the escrow" in html
    assert 'href="/funds/?need=18000000000000000"' in html
    assert 'name="token"' not in html  # no confirm step


def test_confirming_a_quote_submits_the_job_once_however_often_it_is_posted(browser, make_weights, make_dataset):
    _, token = _quote(browser, make_weights, make_dataset)

    first = browser.post("/jobs/new/confirm/", {"token": token})
    second = browser.post("/jobs/new/confirm/", {"token": token})

    job = Job.objects.get()
    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"] == f"/jobs/{job.pk}/"
    assert Posting.objects.filter(kind=Posting.Kind.ESCROW).count() == 1
    assert job.spec["rows_per_unit"] == 4 and job.spec["price_per_result"] == str(10**15)


def test_a_confirm_with_a_token_never_given_out_creates_nothing(browser):
    response = browser.post("/jobs/new/confirm/", {"token": "made-up"})

    assert response.status_code == 302 and response["Location"] == "/jobs/new/"
    assert Job.objects.count() == 0


def test_change_the_job_fills_the_form_with_what_was_quoted(browser, make_weights, make_dataset):
    _, token = _quote(browser, make_weights, make_dataset, rows_per_unit="5")

    html = browser.get(f"/jobs/new/?quote={token}").content.decode()

    assert re.search(r'name="rows_per_unit" value="5"', html)
    assert re.search(r'name="weights" value="[0-9a-f]{64}"', html)


# --- the job page -------------------------------------------------------------------------------

def test_someone_elses_job_is_not_found_on_every_page_of_it(browser, submit_job, other_submitter):
    job = submit_job(owner=other_submitter)

    for url in (f"/jobs/{job.pk}/", f"/jobs/{job.pk}/live/", f"/jobs/{job.pk}/output/"):
        assert browser.get(url).status_code == 404, url
    assert browser.post(f"/jobs/{job.pk}/cancel/").status_code == 404
    job.refresh_from_db()
    assert job.state == Job.State.RUNNING


def test_a_running_jobs_fragment_polls_and_a_final_ones_stops(browser, submit_job):
    job = submit_job()

    running = browser.get(f"/jobs/{job.pk}/live/").content.decode()
    Job.objects.filter(pk=job.pk).update(state=Job.State.FAILED, error="boom")
    failed = browser.get(f"/jobs/{job.pk}/live/").content.decode()

    assert 'hx-trigger="every 2s"' in running and "0 of 3 units decided" in running
    assert "Cancel job" in running
    assert "hx-trigger" not in failed and "Cancel job" not in failed and "boom" in failed


def test_the_job_page_shows_progress_verification_and_cost(browser, submit_job, make_device, contributor,
                                                           other_contributor, report):
    from marketplace.workunits.leasing import workunit_lease

    job = submit_job(rows=8, rows_per_unit=4)
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        for lease in workunit_lease(device=device.device, max_units=8):
            report(device, lease.result_id)
    from marketplace.workunits.verification import unit_validate
    for unit in job.units.all():
        unit_validate(unit_id=unit.pk)

    html = browser.get(f"/jobs/{job.pk}/").content.decode()

    assert re.search(r'id="units-done">2 / 2<', html)
    assert re.search(r"<dt>Devices</dt><dd>2</dd>", html) and re.search(r"<dt>Owners</dt><dd>2</dd>", html)
    assert re.search(r"<dt>Replicas issued</dt><dd>4</dd>", html)
    data = json.loads(unescape(re.search(r'id="job-progress-data" class="chart-data" hidden>(.*?)</div>', html, re.S).group(1)))
    assert data["series"][0]["values"][-1] == 2 and len(data["x"]) == len(data["series"][0]["values"])


def test_cancelling_from_the_page_calls_the_cancel_service(browser, submit_job):
    job = submit_job()

    response = browser.post(f"/jobs/{job.pk}/cancel/", {"confirmed": "yes"})

    job.refresh_from_db()
    assert response.status_code == 302 and job.state == Job.State.CANCELLING


def test_a_cancel_not_yet_confirmed_asks_first_and_changes_nothing(browser, submit_job):
    """Without JavaScript nothing asked before the form was sent: the server asks, with a form that confirms."""
    job = submit_job()
    state = Job.objects.get(pk=job.pk).state

    asked = browser.post(f"/jobs/{job.pk}/cancel/")

    job.refresh_from_db()
    html = asked.content.decode()
    assert asked.status_code == 200 and job.state == state and state != Job.State.CANCELLING
    assert f"Cancel job {job.pk}?" in html and 'name="confirmed" value="yes"' in html


def test_the_output_downloads_once_there_is_one(browser, submit_job, submitter):
    job = submit_job()
    early = browser.get(f"/jobs/{job.pk}/output/")
    artifact, _ = artifact_store(chunks=[b"merged output"], uploaded_by=submitter)
    Job.objects.filter(pk=job.pk).update(state=Job.State.COMPLETED, output=artifact)

    response = browser.get(f"/jobs/{job.pk}/output/")

    assert early.status_code == 302  # back to the job page, which says why
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"merged output"
    assert f'job-{job.pk}-output.safetensors' in response["Content-Disposition"]


# --- funds and statement ------------------------------------------------------------------------

def _link(user):
    key = EthAccount.create()
    user.set_password("pw-of-the-test")
    user.save()
    challenge = wallet_challenge_create(user=user)
    signature = key.sign_message(encode_defunct(text=challenge.message)).signature.to_0x_hex()
    wallet_link(user=user, password="pw-of-the-test", nonce=challenge.nonce, address=key.address, signature=signature)
    return key.address


def test_the_funds_page_shows_the_contract_the_amount_and_the_deposits_credited(browser, submitter, settings):
    settings.IDLEGRID_CHAIN_CONTRACT = "0x" + "ab" * 20
    address = _link(submitter)
    browser.force_login(submitter)  # the password changed
    deposit_credit(chain_id=31337, tx_hash="0x" + "1" * 64, log_index=0, block_number=7, block_hash="0x" + "2" * 64,
                   depositor=address, amount=5 * 10**18)

    html = browser.get("/funds/?need=2500000000000000000").content.decode()

    assert settings.IDLEGRID_CHAIN_CONTRACT in html and address in html
    assert "2.5</code> IGT" in html
    assert 'title="5,000,000,000,000,000,000 base units"' in html
    assert "Could not check" in html  # no chain node in these tests: pending deposits are not guessed


def test_pending_deposits_come_from_a_bounded_read_past_the_followers_cursor(submitter):
    from marketplace.chain.client import DepositEvent
    from marketplace.ledger.statements import deposits_pending

    address = _link(submitter)

    class Chain:
        chain_id = 31337
        asked = None

        def block_number(self):
            return 10_000

        def deposits(self, *, from_block, to_block):
            Chain.asked = (from_block, to_block)
            return [DepositEvent(tx_hash="0x" + "3" * 64, log_index=0, block_number=9_999, block_hash="0x" + "4" * 64,
                                 depositor=address, amount=7),
                    DepositEvent(tx_hash="0x" + "5" * 64, log_index=0, block_number=9_999, block_hash="0x" + "4" * 64,
                                 depositor="0x" + "9" * 40, amount=8)]

    pending = deposits_pending(user=submitter, client=Chain())

    assert Chain.asked == (8_001, 10_000)
    assert pending.checked and [(d["amount"], d["confirmations"]) for d in pending.deposits] == [(7, 1)]


def test_the_statement_pages_the_entries_and_the_csv_has_them_all(browser, submit_job, monkeypatch):
    submit_job(split=False)
    monkeypatch.setattr(views, "LINES_PER_PAGE", 1)

    page = browser.get("/funds/statement/").content.decode()
    response = browser.get("/funds/statement.csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    assert "Page 1 of 3" in page  # the grant, and the escrow out of the balance and into the job's
    assert rows[0] == ["line", "posting", "kind", "account", "amount_base_units", "memo", "created_at"]
    kinds = sorted(row[2] for row in rows[1:])
    assert len(rows) == 4 and kinds == ["escrow", "escrow", "grant"]
    assert response["Content-Type"].startswith("text/csv")


# --- federated jobs -----------------------------------------------------------------------------

def _labelled(rows: int, seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    return save({"x": x, "y": x[:, :3].argmax(axis=1).astype(np.int64)})


def test_a_federated_job_is_quoted_from_its_own_fields(browser, make_weights):
    files = {"weights_file": SimpleUploadedFile("w.safetensors", make_weights("mlp", MLP)),
             "train_dataset_file": SimpleUploadedFile("train.safetensors", _labelled(60, 1)),
             "eval_dataset_file": SimpleUploadedFile("eval.safetensors", _labelled(30, 2))}

    response = browser.post("/jobs/new/", {**_form(kind="fedavg", rows_per_unit="", rounds="2", shards="3"), **files})

    html = response.content.decode()
    assert response.status_code == 200, html[:2000]
    assert "Quote: fedavg job" in html and re.search(r"<dt>Units</dt><dd>6</dd>", html)  # 2 rounds x 3 shards


def test_a_federated_job_without_its_datasets_says_which_are_missing(browser, upload, submitter, make_weights):
    weights = upload(make_weights("mlp", MLP), submitter)

    response = browser.post("/jobs/new/", _form(kind="fedavg", weights=weights, rounds="2", shards="0"))

    html = response.content.decode()
    assert response.status_code == 400
    assert _field_error(html, "train_dataset_file").startswith("Choose a file")
    assert _field_error(html, "eval_dataset_file").startswith("Choose a file")
    assert "greater than or equal to 1" in _field_error(html, "shards")


def test_a_federated_jobs_page_charts_accuracy_and_loss_per_round(browser, upload, submitter, make_weights):
    from marketplace.jobs.models import FedRound
    from marketplace.jobs.services import job_submit

    spec = {"model": {"architecture": "mlp", "config": MLP, "weights": upload(make_weights("mlp", MLP), submitter)},
            "train_dataset": upload(_labelled(60, 1), submitter), "eval_dataset": upload(_labelled(30, 2), submitter),
            "rounds": 2, "shards": 3}
    job = job_submit(owner=submitter, kind="fedavg", spec=spec)
    weights = spec["model"]["weights"]
    FedRound.objects.create(job=job, index=0, weights_in_id=weights, weights_out_id=weights, updates=[1, 2, 3],
                            samples=60, train_loss=1.1, eval_loss=1.0, eval_accuracy=0.5)

    html = browser.get(f"/jobs/{job.pk}/").content.decode()

    data = json.loads(unescape(re.search(r'id="job-rounds-data" class="chart-data" hidden>(.*?)</div>', html, re.S).group(1)))
    assert data["x"] == [0] and [s["label"] for s in data["series"]] == ["eval accuracy", "eval loss", "train loss"]
    assert "1 of 2 aggregated" in html and "50.0 %" in html


def test_a_cancelled_jobs_partial_output_downloads_under_its_own_name(browser, submit_job, submitter):
    job = submit_job()
    artifact, _ = artifact_store(chunks=[b"rows decided so far"], uploaded_by=submitter)
    Job.objects.filter(pk=job.pk).update(state=Job.State.CANCELLED, output=artifact)

    response = browser.get(f"/jobs/{job.pk}/output/")
    page = browser.get(f"/jobs/{job.pk}/").content.decode()

    assert b"".join(response.streaming_content) == b"rows decided so far"
    assert f"job-{job.pk}-output-partial.safetensors" in response["Content-Disposition"]
    assert "Download partial output" in page


def test_a_confirm_posted_while_the_first_is_still_submitting_creates_nothing(browser, submitter, make_weights,
                                                                              make_dataset):
    from marketplace.portal import forms_submit

    _, token = _quote(browser, make_weights, make_dataset)
    assert forms_submit.confirm_claim(user=submitter, token=token) == (True, None)  # the first POST, in flight

    response = browser.post("/jobs/new/confirm/", {"token": token})

    assert response.status_code == 302 and response["Location"] == "/jobs/"
    assert Job.objects.count() == 0


def _rates(settings, **rates):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates}}


def test_quotes_past_the_apis_job_rate_are_refused_and_quote_nothing(settings, browser, upload, submitter,
                                                                     make_weights, make_dataset):
    _rates(settings, job_create="2/minute")
    weights, dataset = upload(make_weights("mlp", MLP), submitter), upload(make_dataset(10, (4,)), submitter)

    codes = [browser.post("/jobs/new/", _form(weights=weights, dataset=dataset)).status_code for _ in range(3)]

    assert codes == [200, 200, 429]
    refused = browser.post("/jobs/new/", _form(weights=weights, dataset=dataset))
    assert "Too many quotes" in refused.content.decode() and "Quote: inference job" not in refused.content.decode()


def test_checks_as_you_type_have_a_count_of_their_own_and_say_when_they_are_past_it(settings, browser):
    _rates(settings, job_create="1/minute")

    first = browser.post("/jobs/new/validate/", {**_form(), "_field": "rows_per_unit"})
    second = browser.post("/jobs/new/validate/", {**_form(), "_field": "rows_per_unit"})

    assert first.status_code == 200 and second.status_code == 429
    assert "Checked too often" in second.content.decode()


def test_uploads_past_the_apis_upload_rate_are_refused_and_store_nothing(settings, browser):
    _rates(settings, upload="1/minute")

    assert browser.post("/jobs/new/upload/", data=b"one", content_type="application/octet-stream").status_code == 201
    refused = browser.post("/jobs/new/upload/", data=b"two", content_type="application/octet-stream")

    assert refused.status_code == 429 and "too many uploads" in refused.json()["error"]
    from marketplace.artifacts.models import Artifact

    assert Artifact.objects.count() == 1


def test_the_progress_series_samples_a_large_job_to_its_point_budget_and_ends_at_the_count(submit_job, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from marketplace.jobs import live
    from marketplace.jobs.services import job_split
    from marketplace.workunits.models import WorkUnit

    monkeypatch.setattr(live, "SERIES_POINTS", 4)
    job = submit_job(rows=100, rows_per_unit=10)
    job_split(job_id=job.pk)
    start = timezone.now() - timedelta(minutes=10)
    Job.objects.filter(pk=job.pk).update(started_at=start)
    job.refresh_from_db()
    for unit in WorkUnit.objects.filter(job=job).order_by("index")[:9]:
        WorkUnit.objects.filter(pk=unit.pk).update(state=WorkUnit.State.DONE,
                                                   finished_at=start + timedelta(seconds=10 * (unit.index + 1)))

    series = live.progress_series(job=job)

    assert series["series"][0]["values"] == [0, 3, 6, 9]  # every 3rd of 9 decided (ceil(9 / 4)), and the last
    assert series["x"] == [int(start.timestamp()) + s for s in (0, 30, 60, 90)]
