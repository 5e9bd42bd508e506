"""The ledger against the real PayoutLedger contract on py-evm (in process), through the chain engineer's
Web3ChainClient: a deposit credited once, an epoch published exactly once whatever crashed and only once
the contract holds its tokens, a contributor claiming with the API's proof, and the chain reconciled with
the ledger."""

import pytest
from eth_account import Account as EthAccount
from ledgerkit import link_wallet, settled_earnings
from web3 import EthereumTesterProvider, Web3

from marketplace.chain.client import Web3ChainClient, contract_artifact, deploy
from marketplace.ledger.deposits import deposits_follow
from marketplace.ledger.epochs import epoch_close, epoch_publish
from marketplace.ledger.exceptions import EpochUnderfunded
from marketplace.ledger.models import Account, Epoch
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.reconcile import chain_reconcile

TOKENS = 10**18


class Killed(BaseException):
    pass


class Dying:
    """A client whose process dies around the send: `after=True` once the node took the transaction,
    `after=False` just before it would have reached the node."""

    def __init__(self, client, *, after: bool):
        self._client, self._after = client, after

    def __getattr__(self, name):
        return getattr(self._client, name)

    def publish_root_send(self, **kwargs):
        if self._after:
            self._client.publish_root_send(**kwargs)
        raise Killed()


class PyEvm:
    def __init__(self):
        provider = EthereumTesterProvider()
        self.w3 = Web3(provider)
        self.tester = provider.ethereum_tester
        keys = [key.to_hex() for key in self.tester.backend.account_keys[:6]]
        self.admin, self.operator, self.submitter, self.contributor = (EthAccount.from_key(k) for k in keys[:4])
        deployment = deploy(w3=self.w3, deployer_key=keys[0], operator=self.operator.address, token=None)
        self.client = Web3ChainClient(self.w3, deployment.ledger, keys[1])
        self.ledger = self.w3.eth.contract(address=deployment.ledger, abi=contract_artifact("PayoutLedger")["abi"])
        self.token = self.w3.eth.contract(address=deployment.token, abi=contract_artifact("TestToken")["abi"])

    def send(self, call, sender: str) -> None:
        receipt = self.w3.eth.wait_for_transaction_receipt(call.transact({"from": sender}))
        assert receipt["status"] == 1

    def deposit(self, amount: int) -> None:
        self.send(self.token.functions.mint(self.submitter.address, amount), self.admin.address)
        self.send(self.token.functions.approve(self.ledger.address, amount), self.submitter.address)
        self.send(self.ledger.functions.deposit(amount), self.submitter.address)

    def roots_published(self) -> int:
        return len(self.ledger.events.RootPublished.get_logs(from_block=0))


@pytest.fixture
def evm(settings):
    chain = PyEvm()
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 1
    settings.IDLEGRID_CHAIN_CONTRACT = chain.ledger.address
    return chain


@pytest.fixture
def epoch(contributor, evm):
    link_wallet(contributor, evm.contributor)
    settled_earnings(contributor, 3 * TOKENS, key="contributor earnings")
    return epoch_close()


def test_a_deposit_on_chain_is_credited_once_to_the_linked_submitter(evm, submitter):
    link_wallet(submitter, evm.submitter)
    before = balance(account_get(Account.Kind.SUBMITTER_BALANCE, user_id=submitter.pk))
    evm.deposit(50 * TOKENS)
    evm.tester.mine_blocks(1)

    assert deposits_follow(client=evm.client) == 1
    assert deposits_follow(client=evm.client) == 0

    assert balance(account_get(Account.Kind.SUBMITTER_BALANCE, user_id=submitter.pk)) == before + 50 * TOKENS


@pytest.mark.parametrize("after", [True, False], ids=["killed-after-send", "killed-before-send"])
def test_killed_around_the_send_then_rerun_publishes_exactly_one_root(evm, epoch, after):
    evm.deposit(3 * TOKENS)
    with pytest.raises(Killed):
        epoch_publish(epoch_id=epoch.pk, client=Dying(evm.client, after=after))

    tx_hash = epoch_publish(epoch_id=epoch.pk, client=evm.client)
    epoch_publish(epoch_id=epoch.pk, client=evm.client)

    epoch.refresh_from_db()
    assert epoch.state == Epoch.State.PUBLISHED
    assert evm.roots_published() == 1
    assert evm.client.published_epoch() == 1
    assert "0x" + evm.client.published_root().hex() == epoch.root
    if not after:  # sent for the first time by the re-run, with the nonce reserved before the crash
        assert evm.w3.eth.get_transaction(tx_hash)["nonce"] == epoch.nonce


def test_a_contributor_claims_with_the_apis_proof_and_the_chain_reconciles(evm, epoch, api, contributor):
    evm.deposit(10 * TOKENS)
    evm.tester.mine_blocks(1)
    deposits_follow(client=evm.client)  # from an address nobody linked: held in suspense, still in custody
    epoch_publish(epoch_id=epoch.pk, client=evm.client)
    proof = api(contributor).get("/api/v1/payouts/proof/").json()

    evm.send(evm.ledger.functions.claim(proof["account"], int(proof["cumulative"]),
                                        [bytes.fromhex(p[2:]) for p in proof["proof"]]), evm.contributor.address)

    assert evm.token.functions.balanceOf(evm.contributor.address).call() == 3 * TOKENS
    report = chain_reconcile(client=evm.client)
    assert report.differences == []
    assert report.figures["claimed"] == str(3 * TOKENS)
    assert report.figures["contract_tokens"] == str(7 * TOKENS)


def test_an_epoch_the_contract_cannot_pay_is_not_sent_until_a_deposit_covers_it(evm, epoch):
    evm.deposit(2 * TOKENS)
    nonce = evm.client.operator_nonce(pending=True)

    with pytest.raises(EpochUnderfunded, match=f"short by {TOKENS}$"):
        epoch_publish(epoch_id=epoch.pk, client=evm.client)

    assert evm.client.operator_nonce(pending=True) == nonce and evm.roots_published() == 0
    assert Epoch.objects.get(pk=epoch.pk).nonce is None
    evm.deposit(TOKENS)
    epoch_publish(epoch_id=epoch.pk, client=evm.client)
    assert evm.roots_published() == 1 and evm.client.published_total() == 3 * TOKENS


def test_reconciliation_reports_a_chain_that_disagrees_with_the_ledger(evm, epoch, caplog):
    # Tokens minted straight to the contract: enough to publish, but no Deposited event the ledger credits.
    evm.send(evm.token.functions.mint(evm.ledger.address, 3 * TOKENS), evm.admin.address)
    epoch_publish(epoch_id=epoch.pk, client=evm.client)

    report = chain_reconcile(client=evm.client)

    assert report.differences == [f"the contract holds {3 * TOKENS} tokens; deposits credited 0 - claimed 0 = 0"]
    assert any(record.levelname == "ERROR" for record in caplog.records)
