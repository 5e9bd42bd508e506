"""The marketplace's boundary with Ethereum (a plain package, not a Django app).

- `merkle`: trees of cumulative earnings in OpenZeppelin's StandardMerkleTree format (pure Python).
- `client`: the `ChainClient` protocol, its web3.py implementation, deployment, revert decoding.
- `anvil`: a local anvil node for tests, benchmarks and the demo.
- `compiled/`: PayoutLedger and TestToken ABI + bytecode, built by contracts/build.mjs and committed.
"""
