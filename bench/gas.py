"""Gas of settling payouts with one Merkle root per epoch, next to paying everyone by ERC-20 transfer.

    .venv/bin/python bench/gas.py                 # 10, 1,000, 100,000 and 1,000,000 paid contributors
    .venv/bin/python bench/gas.py --quick         # 10 and 1,000 (seconds; what the test runs)
    .venv/bin/python bench/gas.py --chain anvil   # on a real anvil node instead of py-evm in process

For each size it builds real trees with marketplace.chain.merkle over that many random accounts and
earnings, deploys a fresh TestToken + PayoutLedger, funds it, and reads gasUsed from real receipts of:
publishRoot for epoch 1 (its storage slots go from zero to non-zero: the first-epoch cost) and epoch 2
(the steady state); claim with a real proof of the tree's full depth (ceil(log2 n) hashes), for a sample of accounts, first as new
token holders (the worst case: two storage slots from zero) and again after epoch 2 raised their
cumulative earnings. The baseline sends real ERC-20 transfers of the same token, one transaction each, to
a sample of new and of existing holders; paying n people that way is n such transactions, so its total is
n x the measured mean: extrapolated from the sample, not sent n times. Both chains use the prague gas
schedule (py-evm's newest; anvil is started with --hardfork prague).

A table, then, as the last line, one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from eth_account import Account  # noqa: E402
from web3 import EthereumTesterProvider, Web3  # noqa: E402

from marketplace.chain.client import contract_artifact, deploy  # noqa: E402
from marketplace.chain.merkle import MerkleTree, tree_build  # noqa: E402

SIZES = [10, 1_000, 100_000, 1_000_000]
QUICK_SIZES = [10, 1_000]
TARGETS = {"publish_root_steady_max": 50_000, "claim_max_at_1m": 100_000}
MAX_EARNING = 10**21  # up to 1,000 tokens of 18 decimals per contributor


class Bench:
    def __init__(self, w3: Web3, keys: list[str]):
        self.w3 = w3
        self.keys = keys
        self.admin, self.operator, self.payer, self.relayer = (Account.from_key(k).address for k in keys[:4])

    def send(self, fn: Any, sender: str) -> int:
        receipt = self.w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender}))
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction failed: {fn.fn_name}")
        return int(receipt["gasUsed"])

    def ledger_new(self, total: int) -> tuple[Any, Any]:
        deployment = deploy(w3=self.w3, deployer_key=self.keys[0], operator=self.operator, token=None)
        ledger = self.w3.eth.contract(address=deployment.ledger, abi=contract_artifact("PayoutLedger")["abi"])
        token = self.w3.eth.contract(address=deployment.token, abi=contract_artifact("TestToken")["abi"])
        self.send(token.functions.mint(self.payer, total), self.admin)
        self.send(token.functions.approve(ledger.address, total), self.payer)
        self.send(ledger.functions.deposit(total), self.payer)
        return ledger, token

    def publish(self, ledger: Any, epoch: int, tree: MerkleTree) -> int:
        return self.send(ledger.functions.publishRoot(epoch, tree.root, tree.total), self.operator)

    def claim(self, ledger: Any, tree: MerkleTree, account: str, amount: int) -> int:
        return self.send(ledger.functions.claim(account, amount, tree.proof(account)), self.relayer)


def size_measure(bench: Bench, size: int, samples: int, rng: random.Random) -> dict[str, Any]:
    started = time.perf_counter()
    first = {"0x" + rng.randbytes(20).hex(): rng.randrange(1, MAX_EARNING) for _ in range(size)}
    tree1 = tree_build(leaves=first.items())
    # Epoch 2: everyone earned a little more (cumulative amounts only grow).
    tree2 = tree_build(leaves=[(a, v + rng.randrange(1, MAX_EARNING)) for a, v in first.items()])
    build_seconds = time.perf_counter() - started

    ledger, token = bench.ledger_new(tree2.total)
    publish_first = bench.publish(ledger, 1, tree1)
    # The deepest leaves (a proof of ceil(log2 n) hashes; the rest are one level shallower) cost the most.
    depth = math.ceil(math.log2(size)) if size > 1 else 0
    accounts = list(first)
    sample: list[str] = []
    deepest_count = 2 * size - 2**depth  # leaves sit at nodes n-1 .. 2n-2; from node 2**depth - 1 on they are deepest
    while len(sample) < min(samples, deepest_count):
        account = Web3.to_checksum_address(rng.choice(accounts))
        if account not in sample and len(tree1.proof(account)) == depth:
            sample.append(account)
    amounts1, amounts2 = dict(tree1.leaves), dict(tree2.leaves)
    claims_first = [bench.claim(ledger, tree1, a, amounts1[a]) for a in sample]
    publish_steady = bench.publish(ledger, 2, tree2)
    claims_repeat = [bench.claim(ledger, tree2, a, amounts2[a]) for a in sample]
    for account in sample:
        assert token.functions.balanceOf(account).call() == amounts2[account]
    return {
        "leaves": size, "proof_depth": depth, "tree_build_seconds": round(build_seconds, 2),
        "publish_root_first_epoch": publish_first, "publish_root_steady": publish_steady,
        "claim_first_max": max(claims_first), "claim_first_mean": round(statistics.fmean(claims_first)),
        "claim_repeat_max": max(claims_repeat), "claim_repeat_mean": round(statistics.fmean(claims_repeat)),
        "claims_measured": len(sample),
    }


def transfers_measure(bench: Bench, samples: int, rng: random.Random) -> dict[str, Any]:
    """Real ERC-20 transfers, one transaction each, of amounts like the earnings above."""
    _, token = bench.ledger_new(1)
    bench.send(token.functions.mint(bench.payer, samples * 2 * MAX_EARNING), bench.admin)
    recipients = ["0x" + rng.randbytes(20).hex() for _ in range(samples)]
    recipients = [Web3.to_checksum_address(r) for r in recipients]
    to_new = [bench.send(token.functions.transfer(r, rng.randrange(1, MAX_EARNING)), bench.payer) for r in recipients]
    to_holder = [bench.send(token.functions.transfer(r, rng.randrange(1, MAX_EARNING)), bench.payer) for r in recipients]
    return {
        "transfers_measured": 2 * samples,
        "transfer_to_new_holder_mean": round(statistics.fmean(to_new)),
        "transfer_to_existing_holder_mean": round(statistics.fmean(to_holder)),
    }


def chain_open(kind: str, stack: ExitStack) -> tuple[Web3, list[str]]:
    if kind == "pyevm":
        provider = EthereumTesterProvider()
        return Web3(provider), [k.to_hex() for k in provider.ethereum_tester.backend.account_keys[:4]]
    from marketplace.chain.anvil import Anvil

    node = stack.enter_context(Anvil(accounts=4))
    return Web3(Web3.HTTPProvider(node.url)), [key for _, key in node.accounts]


def table_print(rows: list[dict[str, Any]], transfers: dict[str, Any]) -> None:
    per_transfer = transfers["transfer_to_new_holder_mean"]
    header = (f"{'paid':>9} {'depth':>5} {'publishRoot':>11} {'publishRoot':>11} {'claim':>9} {'claim':>9} "
              f"{'root + all':>15} {'one transfer':>15}")
    print(header)
    print(f"{'':>9} {'':>5} {'1st epoch':>11} {'steady':>11} {'first':>9} {'repeat':>9} "
          f"{'claim once':>15} {'each (extrap.)':>15}")
    for row in rows:
        print(f"{row['leaves']:>9,} {row['proof_depth']:>5} {row['publish_root_first_epoch']:>11,} "
              f"{row['publish_root_steady']:>11,} {row['claim_first_max']:>9,} {row['claim_repeat_max']:>9,} "
              f"{row['everyone_claims_once_total']:>15,} {row['transfers_total_extrapolated']:>15,}")
    print()
    print(f"Operator gas per epoch: one publishRoot, whatever the number paid. Each claim is paid by its "
          f"contributor, and one claim collects every epoch since the last. Transfers: measured "
          f"{per_transfer:,} gas to a new holder and {transfers['transfer_to_existing_holder_mean']:,} to an "
          f"existing one (mean of {transfers['transfers_measured'] // 2} each); the last column is n x the "
          "new-holder mean, extrapolated, not sent.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated leaf counts")
    parser.add_argument("--chain", choices=["pyevm", "anvil"], default="pyevm")
    parser.add_argument("--claims", type=int, default=5, help="claims measured per size (default 5)")
    parser.add_argument("--transfers", type=int, default=20, help="baseline transfers measured (default 20 of each)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    if any(s < 1 for s in sizes) or args.claims < 1 or args.transfers < 1:
        parser.error("sizes, --claims and --transfers must be positive")

    rng = random.Random(args.seed)
    started = time.perf_counter()
    with ExitStack() as stack:
        w3, keys = chain_open(args.chain, stack)
        bench = Bench(w3, keys)
        transfers = transfers_measure(bench, args.transfers, rng)
        rows = []
        for size in sizes:
            row = size_measure(bench, size, args.claims, rng)
            row["everyone_claims_once_total"] = row["publish_root_steady"] + size * row["claim_first_mean"]
            row["transfers_total_extrapolated"] = size * transfers["transfer_to_new_holder_mean"]
            rows.append(row)
            print(f"measured {size:,} leaves ({row['tree_build_seconds']} s to build two trees)", file=sys.stderr)

    table_print(rows, transfers)
    largest = max(rows, key=lambda r: r["leaves"])
    steady_max = max(r["publish_root_steady"] for r in rows)
    claim_at_largest = max(largest["claim_first_max"], largest["claim_repeat_max"])
    figures = {
        "chain": args.chain, "sizes": {str(r["leaves"]): r for r in rows}, "baseline": transfers,
        "targets": TARGETS,
        "publish_root_steady_max": steady_max,
        "publish_root_first_epoch_max": max(r["publish_root_first_epoch"] for r in rows),
        "claim_max_at_largest": claim_at_largest, "largest_leaves": largest["leaves"],
        "publish_target_met": steady_max <= TARGETS["publish_root_steady_max"],
        "claim_target_met": claim_at_largest <= TARGETS["claim_max_at_1m"] if largest["leaves"] >= 1_000_000 else None,
        "claim_depth_for_1m": math.ceil(math.log2(1_000_000)),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
