"""The demo's money path through real processes: a deposit on anvil funds the job, the agents' valid results
earn, one epoch root is published and made final, each contributor claims with `idlegrid-agent claim`, and
the chain reconciles with the ledger to the base unit (demo/payouts.py, the code bin/demo runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from django.contrib.auth import get_user_model
from safetensors.torch import save as save_safetensors

from demo import payouts
from marketplace.core.tensors import array_file_bytes
from marketplace.ledger.models import Deposit, Epoch, EpochLeaf
from marketplace.ledger.selectors import balances_for
from tests.e2e.conftest import MLP, Client, enrolled
from worker_agent.architectures import resolve

PRICE = 10**15  # IDLEGRID_PRICE_PER_RESULT's default, per valid result
NET = PRICE - PRICE * 500 // 10_000  # after the 5% platform fee
DEPOSIT = 10**18


@pytest.fixture
def local_chain(request):
    """anvil with TestToken + PayoutLedger; the cluster's servers get its settings (requested before
    `cluster`, so the marker is in place when the servers start). Stopped by its PID, always."""
    chain = payouts.chain_start()
    request.node.add_marker(pytest.mark.cluster_env(**chain.server_env(), IDLEGRID_AUDIT_WINDOW_SECONDS="2"))
    try:
        yield chain
    finally:
        chain.stop()


def _submit(client: Client, *, rows: int, rows_per_unit: int) -> int:
    torch.manual_seed(0)
    arch, config = resolve(MLP["architecture"], MLP["config"])
    model = arch.build(config).eval()
    x = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)
    spec = {"model": {**MLP, "weights": client.upload(save_safetensors(model.state_dict()))},
            "dataset": client.upload(array_file_bytes(x, name="x")), "rows_per_unit": rows_per_unit, "batch_size": 5}
    response = client.http.post("/api/v1/jobs/", json={"kind": "inference", "spec": spec})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_deposit_pays_for_a_job_and_each_contributor_claims_exactly_what_the_ledger_settled(local_chain, cluster):
    submitter, alice, bob = (Client(cluster, name) for name in ("submitter", "alice", "bob"))
    wallets = payouts.people_prepare(cluster=cluster, chain=local_chain, folder=cluster.var_dir / "wallets",
                                     tokens={"submitter": submitter.token, "alice": alice.token, "bob": bob.token})
    deposit = payouts.submitter_fund(cluster=cluster, chain=local_chain, wallet=wallets["submitter"], amount=DEPOSIT)
    assert Deposit.objects.get(tx_hash=deposit["tx_hash"]).amount == DEPOSIT
    assert balances_for(user=get_user_model().objects.get(username="submitter"))["available"] == str(DEPOSIT)

    job_id = _submit(submitter, rows=20, rows_per_unit=10)
    state_dirs = {}
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        state_dirs[owner.username] = enrolled(cluster, owner, name)
        cluster.start_agent(name, state_dirs[owner.username], "--batch", "1", "--poll", "0.5")
    assert submitter.wait_for_job(job_id, cluster)["state"] == "completed"

    contributors = [(o.username, state_dirs[o.username], o.token, wallets[o.username]) for o in (alice, bob)]
    paid = payouts.payouts_settle(cluster=cluster, chain=local_chain, contributors=contributors, deposit=deposit,
                                  faulty_devices=[])

    assert paid["ledger_equals_chain"] is True, paid["reconciliation"]
    assert paid["ok"] is True
    epoch = Epoch.objects.get(number=paid["epoch"])
    assert epoch.state == Epoch.State.FINAL and epoch.tx_hash == paid["root_tx_hash"]
    assert local_chain.ledger.functions.publishedRoot().call().hex() == epoch.root.removeprefix("0x")
    for owner in ("alice", "bob"):
        claim = paid["contributors"][owner]
        leaf = EpochLeaf.objects.get(epoch=epoch, address=wallets[owner].address)
        assert leaf.cumulative == 2 * NET  # two units, each computed by both owners' devices
        assert claim["claim_tx_hash"] is not None
        assert claim["claim_amount"] == claim["claimed_on_chain"] == claim["tokens_received"] == str(leaf.cumulative)
    assert paid["reconciliation"]["contract_tokens"] == str(DEPOSIT - 4 * NET)
