"""`bin/demo --portal`: after the run it prints the portal's URL and every demo login, then keeps the cluster
up until Ctrl-C or a server process exits (here: a stand-in web process that exits at once)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from demo import __main__ as demo
from demo.cluster import Cluster


def test_the_portal_mode_prints_the_url_and_logins_and_returns_when_a_server_process_exits(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.setattr(demo, "console", demo.Console(file=sys.stderr, width=200))
    cluster = Cluster(var_dir=tmp_path, passwords={"submitter": "pw-s", "alice": "pw-a", "mallory": "pw-m"})
    web = cluster.start("web", [sys.executable, "-c", "pass"])
    web.popen.wait(10)

    demo.portal_serve(cluster, SimpleNamespace(url="http://127.0.0.1:8545"))

    out = capsys.readouterr().err
    assert f"Portal: {cluster.url}/" in out
    for username, password in cluster.passwords.items():
        assert username in out and password in out
    assert "faulty on purpose" in out  # mallory's role
    assert "a server process exited" in out


def test_portal_mode_is_refused_with_the_federated_scenario(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bin/demo", "--portal", "--fedavg"])
    with pytest.raises(SystemExit) as refused:
        demo.parse_args()
    assert refused.value.code == 2


def test_the_portal_mode_gives_back_the_signal_handlers_it_took(tmp_path, monkeypatch):
    import signal

    monkeypatch.setattr(demo, "console", demo.Console(file=sys.stderr))
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    cluster = Cluster(var_dir=tmp_path)
    cluster.start("web", [sys.executable, "-c", "pass"]).popen.wait(10)

    demo.portal_serve(cluster, SimpleNamespace(url="http://127.0.0.1:8545"))

    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
