"""Reconciliation on the fake chain: the contract's figures (its totalClaimed, per-address claims, token
balance) against the ledger's, with the differences a real contract rarely shows made on purpose."""

import pytest
from ledgerkit import link_wallet, settled_earnings

from marketplace.ledger.deposits import deposits_follow
from marketplace.ledger.epochs import epoch_close, epoch_publish
from marketplace.ledger.reconcile import chain_reconcile

DEPOSITOR = "0x" + "22" * 20


@pytest.fixture
def paid_address(contributor, chain, settings):
    """100 earned, deposited, credited and published in epoch 1; the payout address's key is returned."""
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 1
    key = link_wallet(contributor)
    settled_earnings(contributor, 100, key="earned")
    epoch = epoch_close()
    chain.deposit(DEPOSITOR, 100)
    chain.mine()
    assert deposits_follow(client=chain) == 1
    epoch_publish(epoch_id=epoch.pk, client=chain)
    return key


def test_a_chain_that_agrees_with_the_ledger_reconciles_with_the_contracts_own_claimed_total(paid_address, chain):
    chain.claims[paid_address.address] = 40

    report = chain_reconcile(client=chain)

    assert report.differences == []
    assert (report.figures["claimed"], report.figures["contract_tokens"]) == ("40", "60")


def test_tokens_that_left_the_contract_other_than_by_claims_are_reported_underfunded(paid_address, chain, caplog):
    chain.claims[paid_address.address] = 40
    chain.tokens -= 25  # e.g. a token that charges a fee or rebases: 35 held, 60 still claimable

    report = chain_reconcile(client=chain)

    assert report.differences == ["the contract holds 35 tokens; deposits credited 100 - claimed 40 = 60",
                                  "the contract holds 35 tokens but 60 are claimable: underfunded by 25"]
    assert [r.levelname for r in caplog.records if "underfunded by 25" in r.getMessage()] == ["ERROR"]


def test_claims_paid_to_addresses_the_ledger_never_paid_are_reported(paid_address, chain):
    chain.claims["0x" + "33" * 20] = 7  # paid against a root this ledger did not build

    report = chain_reconcile(client=chain)

    assert report.differences == ["claims paid 7 in all but 0 to the ledger's payout addresses"]
