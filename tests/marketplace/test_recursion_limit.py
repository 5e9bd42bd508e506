"""Marketplace processes do not keep py_ecc's recursion limit of 100000 (marketplace/core/recursion.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("entry", [
    "import marketplace.wsgi",  # gunicorn
    "from marketplace import celery_app",  # celery -A marketplace
    "import django; django.setup()",  # manage.py (settings import marketplace first)
])
def test_a_process_that_imports_eth_account_keeps_a_sane_recursion_limit(entry: str, tmp_path) -> None:
    program = (
        f"{entry}\n"
        "import sys, eth_account, web3\n"  # what ledger/wallets.py and chain/client.py import
        "print(sys.getrecursionlimit())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(DJANGO_SETTINGS_MODULE="marketplace.settings", IDLEGRID_VAR_DIR=str(tmp_path))

    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)

    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == 1000


def test_importing_py_ecc_alone_raises_it(tmp_path) -> None:
    # The premise: without marketplace/core/recursion.py, this is what every web worker would run with.
    done = subprocess.run([sys.executable, "-c", "import sys, py_ecc; print(sys.getrecursionlimit())"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert int(done.stdout) == 100_000
