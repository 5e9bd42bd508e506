"""Deposits: credited once per event, only when deep enough, surviving restarts and reorganisations."""

import pytest
from ledgerkit import link_wallet

from marketplace.ledger.deposits import deposit_credit, deposits_follow
from marketplace.ledger.models import Account, ChainCursor, Deposit
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import ledger_check

K = Account.Kind


@pytest.fixture
def depositor(submitter):
    return link_wallet(submitter).address


def available(user) -> int:
    return balance(account_get(K.SUBMITTER_BALANCE, user_id=user.pk))


def test_a_deposit_event_seen_twice_credits_once(chain, submitter, depositor):
    before = available(submitter)
    event = chain.deposit(depositor, 10**20)
    fields = dict(chain_id=chain.chain_id, tx_hash=event.tx_hash, log_index=event.log_index,
                  block_number=event.block_number, block_hash=event.block_hash, depositor=event.depositor,
                  amount=event.amount)

    assert deposit_credit(**fields) is True
    assert deposit_credit(**fields) is False

    assert available(submitter) == before + 10**20
    assert balance(account_get(K.CHAIN_CUSTODY)) == -(10**20)
    assert Deposit.objects.count() == 1


def test_nothing_is_credited_before_it_is_deep_enough(chain, submitter, depositor, settings):
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 3
    before = available(submitter)
    chain.deposit(depositor, 5)

    assert deposits_follow(client=chain) == 0
    chain.mine(2)
    assert deposits_follow(client=chain) == 0
    chain.mine(1)
    assert deposits_follow(client=chain) == 1
    assert available(submitter) == before + 5


def test_a_restarted_follower_resumes_from_its_cursor(chain, submitter, depositor, settings):
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 0
    chain.deposit(depositor, 1)
    assert deposits_follow(client=chain) == 1
    cursor = ChainCursor.objects.get(chain_id=chain.chain_id)
    chain.deposit(depositor, 2)

    assert deposits_follow(client=chain) == 1  # a new process: state only from the database
    assert deposits_follow(client=chain) == 0
    assert ChainCursor.objects.get(chain_id=chain.chain_id).block_number > cursor.block_number
    assert sorted(Deposit.objects.values_list("amount", flat=True)) == [1, 2]


def test_a_reorg_within_the_depth_never_reaches_the_ledger(chain, submitter, depositor, settings):
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 2
    before = available(submitter)
    chain.mine(3)
    deposits_follow(client=chain)
    chain.deposit(depositor, 7)  # will be orphaned
    assert deposits_follow(client=chain) == 0

    chain.reorg(1)  # the block with the deposit is replaced by one without it
    chain.mine(3)

    assert deposits_follow(client=chain) == 0
    assert available(submitter) == before


def test_a_reorg_deeper_than_the_depth_rewinds_the_cursor_and_credits_nothing_twice(chain, submitter, depositor,
                                                                                      settings):
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 0
    chain.mine(2)
    deposits_follow(client=chain)
    chain.deposit(depositor, 3)
    chain.mine(2)
    assert deposits_follow(client=chain) == 1
    before = ChainCursor.objects.get().block_hash

    chain.reorg(2, keep_events=True)  # the same transactions, mined in new blocks
    chain.deposit(depositor, 4)

    assert deposits_follow(client=chain) == 1  # the new deposit only
    cursor = ChainCursor.objects.get()
    assert cursor.block_hash != before and cursor.block_hash == chain.block_hash(cursor.block_number)
    assert sorted(Deposit.objects.values_list("amount", flat=True)) == [3, 4]
    assert ledger_check() == []


def test_deposits_from_an_unlinked_address_wait_in_suspense_until_it_is_linked(chain, other_submitter):
    from eth_account import Account as EthAccount

    key = EthAccount.create()
    event = chain.deposit(key.address, 9)
    deposit_credit(chain_id=chain.chain_id, tx_hash=event.tx_hash, log_index=0, block_number=event.block_number,
                   block_hash=event.block_hash, depositor=key.address, amount=9)
    before = available(other_submitter)
    assert balance(account_get(K.CHAIN_SUSPENSE, address=key.address)) == 9

    link_wallet(other_submitter, key)

    assert available(other_submitter) == before + 9
    assert balance(account_get(K.CHAIN_SUSPENSE, address=key.address)) == 0


def test_a_malformed_event_is_refused(chain):
    with pytest.raises(ValueError):
        deposit_credit(chain_id=1, tx_hash="0x12", log_index=0, block_number=1, block_hash="0x" + "0" * 64,
                       depositor="0x" + "1" * 40, amount=1)
