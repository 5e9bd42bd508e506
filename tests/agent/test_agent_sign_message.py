"""`idlegrid-agent sign-message`: an EIP-191 signature of a challenge, which the marketplace accepts to link
a payout address; the key never shows, and a bad key or message is said in words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from worker_agent import wallet
from worker_agent.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CHALLENGE = "Idlegrid: link this address to receive payouts.\nAccount: someone (#7)\nNonce: 00ff\nExpires: soon"


def _key_file(tmp_path: Path) -> tuple[Path, str, str]:
    account = Account.create()
    key = "0x" + bytes(account.key).hex()
    path = tmp_path / "payout.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path, key, account.address


def _recovered(message: str, signature: str) -> str:
    return Account.recover_message(encode_defunct(text=message), signature=signature)


def test_it_signs_a_message_file_that_recovers_to_the_key_s_address(tmp_path, capsys):
    key_file, key, address = _key_file(tmp_path)
    (tmp_path / "challenge.txt").write_text(CHALLENGE + "\n")  # an editor's trailing line break is dropped

    code = main(["--state-dir", str(tmp_path / "state"), "sign-message", "--key-file", str(key_file),
                 "--message-file", str(tmp_path / "challenge.txt")])

    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert code == 0
    assert answer["address"] == address
    assert _recovered(CHALLENGE, answer["signature"]) == address
    assert len(answer["signature"]) == 132
    assert key[2:] not in out + err


def test_it_reads_the_message_from_standard_input_as_the_installed_command(tmp_path):
    key_file, key, address = _key_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", wallet.WALLET_KEY_ENV)}

    done = subprocess.run([sys.executable, "-m", "worker_agent", "--state-dir", str(tmp_path / "s"), "sign-message",
                           "--key-file", str(key_file)], input=CHALLENGE.encode(), capture_output=True, cwd=REPO_ROOT,
                          env=env, timeout=60)

    assert done.returncode == 0, done.stderr
    assert _recovered(CHALLENGE, json.loads(done.stdout)["signature"]) == address
    assert key[2:].encode() not in done.stdout + done.stderr


def test_the_key_may_come_from_the_environment(tmp_path, capsys, monkeypatch):
    _, key, address = _key_file(tmp_path)
    monkeypatch.setenv(wallet.WALLET_KEY_ENV, key)
    (tmp_path / "m").write_text(CHALLENGE)

    assert main(["sign-message", "--state-dir", str(tmp_path), "--message-file", str(tmp_path / "m")]) == 0

    assert json.loads(capsys.readouterr().out)["address"] == address


@pytest.mark.parametrize(("content", "said"), [
    (b"", "empty"),
    (b"\xff\xfe", "not UTF-8"),
    (b"x" * (wallet.MAX_MESSAGE_BYTES + 1), "longer than"),
])
def test_an_unusable_message_is_refused_in_words(tmp_path, capsys, caplog, content, said):
    key_file, _, _ = _key_file(tmp_path)
    (tmp_path / "m").write_bytes(content)

    code = main(["sign-message", "--state-dir", str(tmp_path), "--key-file", str(key_file),
                 "--message-file", str(tmp_path / "m")])

    assert code == 1 and capsys.readouterr().out == ""
    assert said in caplog.text


def test_a_file_without_a_key_is_refused_without_echoing_it(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv(wallet.WALLET_KEY_ENV, raising=False)
    (tmp_path / "bad.key").write_text("not-a-key-but-secret-looking")
    (tmp_path / "m").write_text(CHALLENGE)

    code = main(["sign-message", "--state-dir", str(tmp_path), "--key-file", str(tmp_path / "bad.key"),
                 "--message-file", str(tmp_path / "m")])

    said = capsys.readouterr().err + caplog.text
    assert code == 1
    assert "does not hold a private key" in said and "secret-looking" not in said


def test_a_missing_message_file_is_said_in_words(tmp_path, caplog):
    key_file, _, _ = _key_file(tmp_path)

    code = main(["sign-message", "--state-dir", str(tmp_path), "--key-file", str(key_file),
                 "--message-file", str(tmp_path / "missing.txt")])

    assert code == 1
    assert "cannot read the message file" in caplog.text
