"""A local anvil chain for tests, benchmarks and the demo: the binary npm installed under contracts/node_modules,
on a free loopback port, stopped by its PID. Nothing is downloaded.

    with Anvil() as chain:
        w3 = Web3(Web3.HTTPProvider(chain.url))
        deployer_address, deployer_key = chain.accounts[0]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from eth_utils import to_checksum_address

ANVIL_BIN = Path(__file__).resolve().parents[2] / "contracts" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
ANVIL_CHAIN_ID = 31337


class AnvilError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def anvil_binary() -> Path:
    """The anvil binary: IDLEGRID_ANVIL_BIN if set, else the one `npm ci` in contracts/ installed."""
    binary = Path(os.environ.get("IDLEGRID_ANVIL_BIN") or ANVIL_BIN)
    if not os.access(binary, os.X_OK):
        raise AnvilError(f"anvil not found at {binary}: run bin/bootstrap (npm ci in contracts/)")
    return binary


class Anvil:
    """Starts anvil on entry and stops it on exit. `.url` is its JSON-RPC URL, `.accounts` its funded
    dev accounts as (checksum address, 0x private key), `.pid` its process id."""

    def __init__(self, *, accounts: int = 10, chain_id: int = ANVIL_CHAIN_ID, hardfork: str = "prague",
                 startup_seconds: float = 20.0, extra_args: list[str] | None = None):
        if accounts < 1:
            raise ValueError("anvil needs at least one account")
        self._options = [
            "--accounts", str(accounts), "--chain-id", str(chain_id), "--hardfork", hardfork,
            *(extra_args or []),
        ]
        self._startup_seconds = startup_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.chain_id = chain_id
        self.url = ""
        self.accounts: list[tuple[str, str]] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __enter__(self) -> Anvil:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self._process is not None:
            raise AnvilError("this anvil is already running")
        binary = anvil_binary()
        self._workdir = tempfile.TemporaryDirectory(prefix="idlegrid-anvil-")
        # A port picked free can be taken before anvil binds it (by another test run): retry on a new one.
        try:
            for _attempt in range(3):
                if self._launch(binary, _free_port()):
                    return
            raise AnvilError(f"anvil did not start; its log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: Path, port: int) -> bool:
        assert self._workdir is not None
        workdir = Path(self._workdir.name)
        config = workdir / f"config-{port}.json"
        log = (workdir / "anvil.log").open("ab")
        try:
            self._process = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", str(port), "--config-out", str(config), *self._options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self._startup_seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            accounts = self._accounts_read(config)
            if accounts and self._rpc_ready(url):
                self.url = url
                self.accounts = accounts
                return True
            time.sleep(0.05)
        self._terminate()
        raise AnvilError(f"anvil did not answer on {url} within {self._startup_seconds} s; its log:\n{self._log_tail()}")

    def _rpc_ready(self, url: str) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return int(json.load(response)["result"], 16) == self.chain_id
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return False

    @staticmethod
    def _accounts_read(config: Path) -> list[tuple[str, str]]:
        """The dev accounts anvil wrote with --config-out; empty until the file is complete."""
        try:
            data = json.loads(config.read_text())
            pairs = zip(data["available_accounts"], data["private_keys"], strict=True)
            return [(to_checksum_address(address), key) for address, key in pairs]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _log_tail(self) -> str:
        if self._workdir is None:
            return ""
        log = Path(self._workdir.name) / "anvil.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def stop(self) -> None:
        """Stops anvil (SIGTERM, then SIGKILL after 5 s) and removes its folder; safe to call twice."""
        self._terminate()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        self.url = ""
