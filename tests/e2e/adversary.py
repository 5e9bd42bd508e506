"""A hostile device, as a process of its own, for the adversary suite (tests/e2e/test_adversaries.py).

    python -m tests.e2e.adversary --mode hoard --state-dir DIR --summary FILE

It uses the credentials `idlegrid-agent enroll` left in DIR and nothing but the REST API, as any device
could, and runs one attack in a loop until SIGTERM, then writes what the marketplace answered (status
codes per request kind) to FILE as JSON. Modes:

- `hoard`: lease as much as it may, as often as it may, and renew everything it holds by heartbeat, forever.
- `fail`: lease and give every unit up at once, forever.
- `others`: report for results it does not hold (the ids next to its own lease), and, on its own lease,
  name an output it never uploaded (the unit's own input artifact, which exists).
- `metrics`: report a plausible output with hostile metrics: the old dispute marker naming real unit ids,
  bogus values, oversized payloads.
- `bodies`: send hostile bodies to every agent endpoint: nesting bombs, oversized bodies, NaN, 5,000-digit
  numbers, invalid UTF-8, wrong types.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from marketplace.core.tensors import array_file_bytes
from worker_agent.protocol import DEVICE_AUTH_SCHEME, sha256_hex
from worker_agent.signing import sign_result
from worker_agent.state import StateDir

STOP = False


def _stop(signum: int, frame: Any) -> None:
    global STOP
    STOP = True


class Device:
    def __init__(self, state_dir: Path) -> None:
        state = StateDir(state_dir)
        self.device, self.key = state.load_device(), state.load_key()
        self.http = httpx.Client(base_url=self.device.server, timeout=30, headers={
            "Authorization": f"{DEVICE_AUTH_SCHEME} {self.device.device_id}:{self.device.device_secret}"})
        self.seen: Counter[str] = Counter()

    def call(self, kind: str, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.seen[f"{kind} {type(exc).__name__}"] += 1
            return None
        self.seen[f"{kind} {response.status_code}"] += 1
        return response

    def lease(self, max_units: int = 64) -> list[dict[str, Any]]:
        response = self.call("lease", "POST", "/api/v1/agent/lease", json={"max_units": max_units})
        if response is None or response.status_code != 200:
            return []
        return response.json()["leases"]

    def plausible_output(self, lease: dict[str, Any]) -> str:
        """A random output of the right shape, uploaded by this device: its sha256."""
        shape = lease["payload"]["output"]["shape"]
        data = array_file_bytes(np.random.default_rng().standard_normal(shape).astype(np.float32), name="y")
        self.call("upload", "POST", "/api/v1/artifacts/", content=data,
                  headers={"Content-Type": "application/octet-stream"})
        return sha256_hex(data)

    def report(self, lease: dict[str, Any], sha: str, **extra: Any) -> httpx.Response | None:
        signature = sign_result(self.key, result_id=lease["result_id"], unit_id=lease["unit_id"],
                                device_id=self.device.device_id, output_sha256=sha)
        return self.call("report", "POST", f"/api/v1/agent/results/{lease['result_id']}/report",
                         json={"output_sha256": sha, "signature": signature, **extra})


def hoard(device: Device) -> None:
    held: set[int] = set()
    while not STOP:
        held |= {lease["result_id"] for lease in device.lease()}
        if held:
            response = device.call("heartbeat", "POST", "/api/v1/agent/heartbeat", json={"result_ids": sorted(held)})
            if response is not None and response.status_code == 200:
                held -= set(response.json()["lost"])
        time.sleep(0.2)


def fail(device: Device) -> None:
    while not STOP:
        for lease in device.lease():
            device.call("fail", "POST", f"/api/v1/agent/results/{lease['result_id']}/fail", json={"error": "no"})
        time.sleep(0.2)


def others(device: Device) -> None:
    while not STOP:
        for lease in device.lease(1):
            input_sha = next(iter(lease["payload"]["inputs"].values()))
            device.report(lease, input_sha)  # an artifact that exists, but that it never uploaded
            for offset in (-3, -2, -1, 1, 2, 3):  # results of other devices' leases, most likely
                neighbour = {**lease, "result_id": lease["result_id"] + offset}
                device.report(neighbour, device.plausible_output(lease))
        time.sleep(0.2)


def metrics(device: Device) -> None:
    while not STOP:
        for lease in device.lease(1):
            sha = device.plausible_output(lease)
            for hostile in ({"disputes_known_answer": lease["unit_id"]}, {"disputes_known_answer": 999999},
                            {"disputes_known_answer": "abc"}, {"x": "y" * 100_000},
                            {f"k{i}": i for i in range(1000)}, {"nested": {"a": [1, 2, {"b": 3}]}}):
                device.report(lease, sha, metrics=hostile)
        time.sleep(0.2)


def _bombs() -> list[tuple[str, bytes, str]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("deep", deep, "application/json"),
        ("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
        ("huge", b'{"max_units": 1, "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}', "application/json"),
        ("nan", b'{"max_units": NaN}', "application/json"),
        ("digits", b'{"max_units": ' + b"9" * 5000 + b"}", "application/json"),
        ("utf8", b'{"max_units": "\xff\xfe"}', "application/json"),
        ("types", b'{"max_units": {"a": [1]}, "result_ids": "all", "error": 7}', "application/json"),
        ("not json", b"\x80\x04K.", "application/json"),
    ]


def bodies(device: Device) -> None:
    paths = ["/api/v1/agent/lease", "/api/v1/agent/heartbeat", "/api/v1/agent/results/1/report",
             "/api/v1/agent/results/1/fail", "/api/v1/agent/results/1/release", "/api/v1/agent/enroll"]
    while not STOP:
        for path in paths:
            for name, body, content_type in _bombs():
                if STOP:
                    return
                device.call(f"bomb {name}", "POST", path, content=body, headers={"Content-Type": content_type})
        time.sleep(0.2)


MODES = {"hoard": hoard, "fail": fail, "others": others, "metrics": metrics, "bodies": bodies}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    device = Device(args.state_dir)
    try:
        MODES[args.mode](device)
    finally:
        args.summary.write_text(json.dumps(dict(device.seen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
