"""Fixtures for the worker agent tests. None of them need Django or a database."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The agent is tested from a checkout; make `import worker_agent` work however pytest was started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from worker_agent.pinning import KeyPins, parse_keys, save_pins  # noqa: E402
from worker_agent.state import DeviceState, StateDir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_stub import StubMarketplace  # noqa: E402


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def stub(device_key: Ed25519PrivateKey) -> StubMarketplace:
    return StubMarketplace(public_key=device_key.public_key())


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "agent-home")
    state.ensure()
    return state


@pytest.fixture
def enrolled(state: StateDir, stub: StubMarketplace, device_key: Ed25519PrivateKey) -> DeviceState:
    """A state dir as `idlegrid-agent enroll` leaves it, pointing at the stub (server set per test), with
    the stub's signing key pinned."""
    device = DeviceState(server="http://stub", device_id=stub.device_id, device_secret=stub.device_secret,
                         name="test-box", lease_seconds=stub.lease_seconds)
    state.save_key(device_key)
    save_pins(state, KeyPins(parse_keys(stub.keys)))
    state.save_device(device)
    return device


@pytest.fixture
def single_thread_torch() -> Iterator[None]:
    """The in-process reference must run like the child: one thread, deterministic algorithms."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
