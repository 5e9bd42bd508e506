"""The ledger in the API: balances, entries, and the proof a contributor claims with."""

import pytest
from ledgerkit import link_wallet, settled_earnings

from marketplace.chain.merkle import proof_verify
from marketplace.ledger.epochs import epoch_close, epoch_publish


def test_a_submitter_sees_their_balance_and_escrow_as_strings(api, submitter, submit_job):
    submit_job(rows=4, rows_per_unit=4)

    body = api(submitter).get("/api/v1/ledger/balances/").json()

    assert body["escrowed"] == str(6 * 10**15)
    assert body["available"] == str(10**24 - 6 * 10**15)


def test_entries_list_the_persons_own_lines_newest_first(api, submitter, other_submitter, submit_job):
    job = submit_job(rows=4, rows_per_unit=4)

    entries = api(submitter).get("/api/v1/ledger/entries/?limit=10").json()["results"]

    assert [e["kind"] for e in entries] == ["escrow", "escrow", "grant"]
    assert {e["account"] for e in entries} == {f"submitter_balance:user={submitter.pk}", f"job_escrow:job={job.pk}"}
    assert [e["amount"] for e in entries[:2]] in ([str(-6 * 10**15), str(6 * 10**15)], [str(6 * 10**15), str(-6 * 10**15)])
    assert api(other_submitter).get("/api/v1/ledger/entries/").json()["results"][0]["kind"] == "grant"
    assert api(submitter).get("/api/v1/ledger/entries/?limit=0").status_code == 400


def test_no_proof_without_a_payout_address_or_a_published_epoch(api, contributor):
    response = api(contributor).get("/api/v1/payouts/proof/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_proof"

    link_wallet(contributor)
    settled_earnings(contributor, 10, key="c")
    epoch_close()
    assert "no epoch has been published" in api(contributor).get("/api/v1/payouts/proof/").json()["error"]["message"]


def test_the_proof_is_for_the_callers_address_in_the_latest_published_epoch(api, contributor, chain, settings):
    settings.IDLEGRID_CHAIN_CONTRACT = "0x" + "ab" * 20
    key = link_wallet(contributor)
    settled_earnings(contributor, 3 * 10**21, key="c")
    epoch = epoch_close()
    chain.deposit("0x" + "22" * 20, 3 * 10**21)  # the tokens the root commits
    epoch_publish(epoch_id=epoch.pk, client=chain)

    body = api(contributor).get("/api/v1/payouts/proof/").json()

    assert (body["epoch"], body["account"], body["cumulative"]) == (1, key.address, str(3 * 10**21))
    assert (body["contract"], body["chain_id"]) == (settings.IDLEGRID_CHAIN_CONTRACT, chain.chain_id)
    assert proof_verify(root=bytes.fromhex(body["root"][2:]), account=key.address, amount=3 * 10**21,
                        proof=[bytes.fromhex(p[2:]) for p in body["proof"]])


def test_a_device_reads_its_owners_proof(api, contributor, chain, settings, make_device):
    settings.IDLEGRID_CHAIN_CONTRACT = "0x" + "ab" * 20
    key = link_wallet(contributor)
    settled_earnings(contributor, 5 * 10**18, key="d")
    chain.deposit("0x" + "22" * 20, 5 * 10**18)
    epoch_publish(epoch_id=epoch_close().pk, client=chain)

    response = make_device(contributor).client().get("/api/v1/payouts/proof/")
    assert response.status_code == 200, response.json()
    body = response.json()

    assert (body["account"], body["cumulative"]) == (key.address, str(5 * 10**18))


@pytest.mark.parametrize("url", ["/api/v1/ledger/balances/", "/api/v1/ledger/entries/", "/api/v1/payouts/proof/",
                                 "/api/v1/wallet/challenge/"])
def test_the_ledger_api_is_for_people_only(api, url):
    assert api().get(url).status_code == 401
