"""The compiled contracts committed under marketplace/chain/compiled/ are exactly what the pinned compiler
makes of contracts/src today: a stale artifact would deploy code nobody reviewed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "marketplace" / "chain" / "compiled"


def test_a_fresh_compile_matches_the_committed_artifacts_byte_for_byte(tmp_path):
    node = shutil.which("node")
    if node is None or not (ROOT / "contracts" / "node_modules" / "solc").is_dir():
        pytest.fail("node and contracts/node_modules are needed: run bin/bootstrap")
    done = subprocess.run([node, "build.mjs", "--out", str(tmp_path)], cwd=ROOT / "contracts",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    fresh = sorted(p.name for p in tmp_path.glob("*.json"))
    assert fresh == sorted(p.name for p in COMPILED.glob("*.json")) == ["PayoutLedger.json", "TestToken.json"]
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (COMPILED / name).read_bytes(), f"{name} is stale: run node contracts/build.mjs"


def test_the_artifacts_were_compiled_for_prague_with_the_optimizer():
    for path in COMPILED.glob("*.json"):
        artifact = json.loads(path.read_text())
        assert artifact["compiler"]["evmVersion"] == "prague"
        assert artifact["compiler"]["optimizer"]["enabled"] is True
        assert artifact["bytecode"].startswith("0x60") and len(artifact["deployedBytecode"]) > 1000


def test_the_compiler_is_the_one_the_lock_file_pins():
    lock = json.loads((ROOT / "contracts" / "package-lock.json").read_text())
    solc_version = lock["packages"]["node_modules/solc"]["version"]
    artifact = json.loads((COMPILED / "PayoutLedger.json").read_text())
    assert artifact["compiler"]["solc"].startswith(f"{solc_version}+")
