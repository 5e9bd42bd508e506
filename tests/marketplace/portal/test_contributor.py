"""The contributor's pages: devices and why one gets no work, enrolment with a token shown once, earnings,
and the payout address (linking by signature, the proof, the claim command and calldata)."""

from __future__ import annotations

import re
import shlex
from datetime import timedelta
from html import unescape

import pytest
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import Web3

from marketplace.accounts.models import EnrollmentToken
from marketplace.chain.client import contract_artifact
from marketplace.ledger.epochs import epoch_close
from marketplace.ledger.models import Earning, Epoch, WalletChallenge, WalletLink
from marketplace.workers.models import Device
from marketplace.workers.services import _hash_secret, device_seen
from marketplace.workunits.availability import device_outlook
from marketplace.workunits.leasing import workunit_lease
from worker_agent.wire import Capabilities

PASSWORD = "contributor-password"


def text(response) -> str:
    return unescape(re.sub(r"\s+", " ", response.content.decode()))


def reasons(response) -> list[str]:
    return re.findall(r'data-reason="([a-z_]+)"', response.content.decode())


# --- devices --------------------------------------------------------------------------------------

def test_the_devices_page_needs_a_login(client):
    response = client.get("/devices/")

    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_newcomer_sees_how_to_enrol(signed_in, contributor):
    response = signed_in(contributor).get("/devices/")

    assert response.status_code == 200
    assert "No devices yet" in text(response)
    assert 'href="/devices/enrol/"' in response.content.decode()


def test_the_page_shows_ones_own_devices_and_never_another_persons(signed_in, make_device, contributor,
                                                                   other_contributor):
    make_device(contributor, name="study-pc")
    make_device(other_contributor, name="neighbours-box")

    for path in ("/devices/", "/devices/list/"):
        page = text(signed_in(contributor).get(path))
        assert "study-pc" in page
        assert "neighbours-box" not in page


def test_a_device_shows_its_results_audits_trust_and_last_seen(signed_in, trusted_device, contributor):
    enrolled = trusted_device(contributor, name="trusty")
    Device.objects.filter(pk=enrolled.pk).update(valid_results=41, invalid_results=2, audits_passed=7)

    page = text(signed_in(contributor).get("/devices/"))

    assert "trusty" in page
    assert re.search(r"Valid results</dt><dd>41<", page) and re.search(r"Invalid results</dt><dd>2<", page)
    assert re.search(r"Audits passed</dt><dd>7<", page)
    assert re.search(r"<td>inference</td><td><span class=\"badge trusted\">trusted", page)
    assert "never" not in page.split("Last seen")[1][:80]  # enrolment counts as seen


def test_a_new_device_is_on_probation(signed_in, make_device, contributor):
    make_device(contributor)

    assert "On probation for every kind" in text(signed_in(contributor).get("/devices/"))


def test_a_device_with_work_waiting_gets_work(signed_in, make_device, submit_job, contributor):
    make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)

    response = signed_in(contributor).get("/devices/")

    assert reasons(response) == []
    assert "Gets work when it asks" in text(response)


def test_without_any_job_it_says_no_jobs_it_can_run(signed_in, make_device, contributor):
    make_device(contributor)

    response = signed_in(contributor).get("/devices/")

    assert reasons(response) == ["no_work"]
    assert "No jobs it can run" in text(response)


def test_when_only_units_its_owner_already_had_are_left_it_says_so(signed_in, make_device, submit_job, contributor):
    first, second = make_device(contributor, name="first"), make_device(contributor, name="second")
    submit_job(rows=4, rows_per_unit=4)  # one unit, two replicas: two owners needed
    assert len(workunit_lease(device=first.device, max_units=4)) == 1

    assert workunit_lease(device=second.device, max_units=4) == []  # the lease agrees
    assert [r.code for r in device_outlook(device=second.refresh()).reasons] == ["other_owners"]
    assert "needs results from different owners" in text(signed_in(contributor).get("/devices/"))


def test_a_device_too_small_for_the_units_waiting_says_what_it_reported(signed_in, make_device, submit_job, contributor):
    device = make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)
    small = Capabilities(memory_mb=8, cores=2, kinds=("fedavg", "inference"))
    assert workunit_lease(device=device.device, max_units=4, capabilities=small) == []  # the lease agrees

    (reason,) = device_outlook(device=device.refresh()).reasons

    assert reason.code == "too_small" and "8 MB free, no GPU, runs fedavg, inference" in reason.text
    assert "need more than it reported" in text(signed_in(contributor).get("/devices/"))
    roomy = Capabilities(memory_mb=4096, cores=2, kinds=("inference",))
    assert len(workunit_lease(device=device.device, max_units=4, capabilities=roomy)) == 1


def test_a_device_at_its_lease_quota_is_throttled(settings, make_device, submit_job, contributor):
    settings.IDLEGRID_PROBATION_LEASES = 1
    device = make_device(contributor)
    submit_job(rows=8, rows_per_unit=4)
    assert len(workunit_lease(device=device.device, max_units=4)) == 1

    (reason,) = device_outlook(device=device.refresh()).reasons

    assert reason.code == "quota" and "Throttled" in reason.text and "probation" in reason.text
    assert workunit_lease(device=device.device, max_units=4) == []


def test_a_device_on_cool_down_says_until_when(signed_in, make_device, submit_job, contributor):
    device = make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)
    until = timezone.now() + timedelta(seconds=90)
    Device.objects.filter(pk=device.pk).update(cooldown_until=until)

    response = signed_in(contributor).get("/devices/")

    assert reasons(response) == ["cooldown"]
    assert until.strftime("%Y-%m-%dT%H:%M") in response.content.decode()
    assert workunit_lease(device=device.refresh(), max_units=1) == []


def test_a_banned_device_shows_the_ban_and_its_reason(signed_in, make_device, submit_job, contributor):
    device = make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)
    Device.objects.filter(pk=device.pk).update(state=Device.State.BANNED, banned_at=timezone.now(),
                                               ban_reason="failed the audit of unit 12")

    response = signed_in(contributor).get("/devices/")

    assert reasons(response) == ["banned"]
    assert "failed the audit of unit 12" in text(response)
    assert device.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json").status_code == 401


def test_a_disabled_device_says_so(make_device, contributor):
    device = make_device(contributor)
    Device.objects.filter(pk=device.pk).update(state=Device.State.DISABLED)

    assert [r.code for r in device_outlook(device=device.refresh()).reasons] == ["disabled"]


def test_a_device_of_a_deactivated_account_says_so(make_device, submit_job, contributor):
    device = make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)
    contributor.is_active = False
    contributor.save(update_fields=["is_active"])

    outlook = device_outlook(device=Device.objects.select_related("owner").get(pk=device.pk))

    assert [r.code for r in outlook.reasons] == ["owner_inactive"]
    assert device.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json").status_code == 401


def test_a_device_not_seen_lately_is_offline(settings, signed_in, make_device, submit_job, contributor):
    device = make_device(contributor)
    submit_job(rows=4, rows_per_unit=4)
    Device.objects.filter(pk=device.pk).update(
        last_seen_at=timezone.now() - timedelta(seconds=settings.IDLEGRID_DEVICE_ONLINE_SECONDS + 5))

    response = signed_in(contributor).get("/devices/")

    assert reasons(response) == ["offline"]
    assert "idlegrid-agent run" in text(response)


def test_a_lease_poll_counts_as_seen_at_most_once_per_resolution(make_device, contributor):
    device = make_device(contributor)
    old = timezone.now() - timedelta(minutes=10)
    Device.objects.filter(pk=device.pk).update(last_seen_at=old)

    assert device.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json").status_code == 200
    seen = device.refresh().last_seen_at
    device_seen(device=Device(pk=device.device.pk, last_seen_at=old), now=seen + timedelta(seconds=5))

    assert seen > old
    assert device.refresh().last_seen_at == seen  # a stale copy of the row: the conditional UPDATE matched nothing


def test_a_lease_poll_within_the_resolution_sends_no_statement_for_it(make_device, contributor,
                                                                       django_assert_num_queries):
    device = make_device(contributor).refresh()
    Device.objects.filter(pk=device.pk).update(last_seen_at=timezone.now())
    device.refresh_from_db()

    with django_assert_num_queries(0):
        device_seen(device=device, now=device.last_seen_at + timedelta(seconds=5))


# --- enrolment ------------------------------------------------------------------------------------

def test_enrolling_shows_the_token_and_the_command_once(signed_in, contributor):
    client = signed_in(contributor)

    posted = client.post("/devices/enrol/", {"name": "study pc"})
    shown = client.get(posted["Location"])
    again = client.get("/devices/enrol/")

    assert posted.status_code == 302
    command = re.search(r'<pre class="command" id="enrol-command">(.*?)</pre>', shown.content.decode(), re.S)
    lines = unescape(command.group(1)).splitlines()
    assert lines[1] == "idlegrid-agent run"
    words = shlex.split(lines[0])
    assert words[:4] == ["idlegrid-agent", "enroll", "--server", "http://testserver"]
    assert words[4] == "--token" and words[6:] == ["--name", "study pc"]
    row = EnrollmentToken.objects.get(owner=contributor)
    assert row.token_hash == _hash_secret(words[5]) and row.used_at is None
    assert "no-store" in shown["Cache-Control"]
    assert words[5] not in again.content.decode()
    assert "enrol-command" not in again.content.decode()


def test_an_enrolment_without_a_name_is_refused_next_to_the_field(signed_in, contributor):
    response = signed_in(contributor).post("/devices/enrol/", {"name": "  "})

    assert response.status_code == 400
    assert re.search(r'id="id_name".*?class="field-error"[^>]*>This field is required', response.content.decode(), re.S)
    assert not EnrollmentToken.objects.exists()


def test_enrolments_past_the_hourly_limit_are_refused_in_words(settings, signed_in, contributor):
    settings.IDLEGRID_ENROLLMENTS_PER_HOUR = 1
    client = signed_in(contributor)
    client.post("/devices/enrol/", {"name": "one"})

    response = client.post("/devices/enrol/", {"name": "two"})

    assert response.status_code == 400
    assert "at most 1 enrolment tokens per hour" in text(response)
    assert EnrollmentToken.objects.count() == 1


# --- earnings -------------------------------------------------------------------------------------

def test_a_newcomer_s_earnings_say_what_to_do(signed_in, contributor):
    page = text(signed_in(contributor).get("/earnings/"))

    assert "Nothing held" in page and "Enrol and run a device" in page
    assert "No epoch has paid your payout address yet" in page


def test_held_earnings_show_with_when_they_settle_and_only_ones_own(signed_in, submit_job, compute_unit, contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    compute_unit(job.units.get())
    mine = Earning.objects.get(user=contributor)

    response = signed_in(contributor).get("/earnings/")
    page = text(response)

    assert mine.state == Earning.State.HELD
    assert f'title="{int(mine.net):,} base units"' in page
    assert mine.settle_after.strftime("%Y-%m-%dT%H:%M") in page
    assert f'<td>mine</td><td>#{job.pk}</td><td class="num">1</td>' in page
    assert "theirs" not in page
    series = response.context["report"].series
    assert len(series["x"]) == 2 and series["series"][0]["values"] == [0, int(mine.net) / 10**18]
    assert 'id="earnings-series"' in page


def test_settled_earnings_and_the_epoch_that_paid_them(settings, signed_in, submit_job, compute_unit, contributor):
    settings.IDLEGRID_AUDIT_WINDOW_SECONDS = 0
    job = submit_job(rows=4, rows_per_unit=4)
    compute_unit(job.units.get())
    address = _link(contributor)
    epoch = epoch_close()

    page = text(signed_in(contributor).get("/earnings/"))

    net = int(Earning.objects.get(user=contributor).net)
    assert epoch is not None and Earning.objects.get(user=contributor).state == Earning.State.SETTLED
    assert f'Settled</dt><dd><span class="amount" title="{net:,} base units"' in page
    assert address in page
    assert "shown on chain only" in page  # no chain configured in these tests


# --- payout address -------------------------------------------------------------------------------

def _challenge(client) -> tuple[str, str]:
    page = client.get("/payout/").content.decode()
    message = unescape(re.search(r'<pre class="command" id="challenge-message">(.*?)</pre>', page, re.S).group(1))
    nonce = re.search(r'name="nonce" value="([0-9a-f]+)"', page).group(1)
    return message, nonce


def _signed(message: str, account=None):
    account = account or Account.create()
    return account, "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()


def _link(user) -> str:
    from marketplace.ledger.wallets import wallet_challenge_create, wallet_link

    challenge = wallet_challenge_create(user=user)
    account, signature = _signed(challenge.message)
    wallet_link(user=user, password=PASSWORD, nonce=challenge.nonce, address=account.address, signature=signature)
    return account.address


def test_the_page_keeps_its_challenge_across_views(signed_in, contributor):
    client = signed_in(contributor)

    assert _challenge(client) == _challenge(client)
    assert WalletChallenge.objects.filter(user=contributor).count() == 1


def test_a_pasted_signature_and_the_password_link_the_address(signed_in, contributor):
    client = signed_in(contributor)
    message, nonce = _challenge(client)
    account, signature = _signed(message)

    response = client.post("/payout/", {"nonce": nonce, "address": account.address, "signature": signature,
                                        "password": PASSWORD}, follow=True)

    assert WalletLink.objects.get(user=contributor, active=True).address == account.address
    assert f'<code id="active-address">{account.address}</code>' in text(response)
    assert "is your payout address from now on" in text(response)


@pytest.mark.parametrize(("change", "field", "said"), [
    ({"password": "wrong"}, "password", "The password is wrong"),
    ({"signature": "0x1234"}, "signature", "A signature is 0x followed by 130 hex digits"),
    ({"address": "0xnothex"}, "address", "An address is 0x followed by 40 hex digits"),
    ({"signer": True}, "signature", "The signature was made by"),
])
def test_a_refused_link_says_why_next_to_the_field_and_changes_nothing(signed_in, contributor, change, field, said):
    client = signed_in(contributor)
    message, nonce = _challenge(client)
    account, signature = _signed(message)
    if change.pop("signer", False):
        _, signature = _signed(message, Account.create())  # another key signed
    body = {"nonce": nonce, "address": account.address, "signature": signature, "password": PASSWORD, **change}

    response = client.post("/payout/", body)

    assert response.status_code == 400
    assert re.search(rf'id="id_{field}".*?class="field-error"[^>]*>{re.escape(said)}', text(response), re.S)
    assert not WalletLink.objects.exists()
    assert not WalletChallenge.objects.filter(user=contributor, used_at__isnull=False).exists()


def test_a_change_of_address_is_pending_and_can_be_cancelled(signed_in, contributor):
    first = _link(contributor)
    client = signed_in(contributor)
    message, nonce = _challenge(client)
    account, signature = _signed(message)

    page = text(client.post("/payout/", {"nonce": nonce, "address": account.address, "signature": signature,
                                         "password": PASSWORD}, follow=True))

    assert "Change pending" in page and account.address in page and first in page
    cancelled = text(client.post("/payout/cancel/", follow=True))
    assert "was cancelled" in cancelled and "Change pending" not in cancelled
    assert WalletLink.objects.get(user=contributor, active=True).address == first


def test_without_a_published_epoch_the_page_says_so(signed_in, contributor):
    _link(contributor)

    assert "No epoch has been published on chain yet" in text(signed_in(contributor).get("/payout/"))


def test_the_proof_the_claim_command_and_the_calldata_of_a_published_epoch(
        settings, signed_in, submit_job, compute_unit, contributor):
    settings.IDLEGRID_AUDIT_WINDOW_SECONDS = 0
    settings.IDLEGRID_CHAIN_CONTRACT = "0x" + "ab" * 20
    settings.IDLEGRID_CHAIN_RPC_URL = "http://127.0.0.1:8545"
    job = submit_job(rows=4, rows_per_unit=4)
    compute_unit(job.units.get())
    address = _link(contributor)
    epoch = epoch_close()
    Epoch.objects.filter(pk=epoch.pk).update(state=Epoch.State.PUBLISHED, chain_id=31337)  # as epoch_publish would
    leaf = epoch.leaves.get(address=address)

    page = signed_in(contributor).get("/payout/").content.decode()

    assert epoch.root in page and f"{int(leaf.cumulative)} base units" in page
    command = shlex.split(unescape(re.search(r'id="claim-command">(.*?)</pre>', page, re.S).group(1)))
    assert command[:2] == ["idlegrid-agent", "claim"] and command[command.index("--rpc-url") + 1] == "http://127.0.0.1:8545"
    assert command[command.index("--server") + 1] == "http://testserver"
    calldata = re.search(r'data-data="(0x[0-9a-f]+)"', page).group(1)
    contract = Web3().eth.contract(abi=contract_artifact("PayoutLedger")["abi"])
    function, args = contract.decode_function_input(calldata)
    assert function.fn_name == "claim"
    assert (args["account"], args["cumulativeAmount"]) == (address, int(leaf.cumulative))
    assert [Web3.to_hex(p) for p in args["proof"]] == leaf.proof
    assert 'data-chain="0x7a69"' in page


def test_link_attempts_past_the_wallet_rate_are_refused_before_the_password_is_checked(settings, signed_in,
                                                                                      contributor):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],
                                                          "wallet": "2/minute"}}
    client = signed_in(contributor)
    message, nonce = _challenge(client)
    account, signature = _signed(message)
    guess = {"nonce": nonce, "address": account.address, "signature": signature, "password": "guess"}

    assert [client.post("/payout/", guess).status_code for _ in range(2)] == [400, 400]
    refused = client.post("/payout/", {**guess, "password": PASSWORD})

    assert refused.status_code == 429
    assert "Too many attempts" in text(refused)
    assert not WalletLink.objects.exists()
