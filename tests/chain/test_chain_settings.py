"""The chain settings are optional, come from the environment (the operator key also from a file), and
fail loudly on a bad value without printing a key (each case in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

SETUP = ("import django; django.setup(); from django.conf import settings as s; "
         "print(s.IDLEGRID_CHAIN_RPC_URL, s.IDLEGRID_CHAIN_CONTRACT, bool(s.IDLEGRID_CHAIN_OPERATOR_KEY), "
         "s.IDLEGRID_CHAIN_CONFIRMATIONS, s.IDLEGRID_EPOCH_SECONDS)")
KEY = "ab" * 32


def django_setup(tmp_path, **env):
    clean = {name: value for name, value in os.environ.items() if not name.startswith("IDLEGRID_")}
    clean.update(DJANGO_SETTINGS_MODULE="marketplace.settings", IDLEGRID_VAR_DIR=str(tmp_path / "var"), **env)
    return subprocess.run([sys.executable, "-c", SETUP], cwd=settings.BASE_DIR, env=clean, capture_output=True,
                          text=True, timeout=120)


def test_without_chain_settings_the_marketplace_starts_with_no_chain(tmp_path):
    run = django_setup(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "None", "False", "2", "3600"]


def test_the_operator_key_may_come_from_a_file(tmp_path):
    key_file = tmp_path / "operator.key"
    key_file.write_text("0x" + KEY + "\n")
    run = django_setup(tmp_path, IDLEGRID_CHAIN_RPC_URL="http://127.0.0.1:8545",
                       IDLEGRID_CHAIN_CONTRACT="0x" + "12" * 20, IDLEGRID_CHAIN_OPERATOR_KEY_FILE=str(key_file),
                       IDLEGRID_CHAIN_CONFIRMATIONS="5", IDLEGRID_EPOCH_SECONDS="600")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["http://127.0.0.1:8545", "0x" + "12" * 20, "True", "5", "600"]


@pytest.mark.parametrize(("name", "value"), [
    ("IDLEGRID_CHAIN_RPC_URL", "127.0.0.1:8545"),
    ("IDLEGRID_CHAIN_CONTRACT", "0x1234"),
    ("IDLEGRID_CHAIN_OPERATOR_KEY", KEY[:-2] + "zz"),
    ("IDLEGRID_CHAIN_CONFIRMATIONS", "-1"),
    ("IDLEGRID_EPOCH_SECONDS", "0"),
])
def test_a_bad_chain_setting_stops_the_start_and_names_itself(tmp_path, name, value):
    run = django_setup(tmp_path, **{name: value})
    assert run.returncode != 0
    assert name in run.stderr
    assert KEY[:-2] not in run.stderr
