"""SSRF: webhooks go to public addresses only, checked at registration and again before each attempt
(DNS changes), and the attempt connects to the address that was checked."""

from __future__ import annotations

import pytest

from marketplace.webhooks import catalog, targets
from marketplace.webhooks.delivery import delivery_attempt
from marketplace.webhooks.models import Delivery, Endpoint
from marketplace.webhooks.services import endpoint_create, endpoint_update, event_emit
from marketplace.webhooks.targets import TargetRefused, address_refusal, target_check

REFUSED = [
    "http://127.0.0.1/hook", "https://127.0.0.1:8443/hook", "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/",
    "http://0.0.0.0/", "http://[::]/", "http://100.64.0.1/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://[2002:7f00:1::]/", "http://[64:ff9b::a00:1]/",
    "http://localhost:8000/", "http://2130706433/", "http://0x7f.1/",
]


@pytest.fixture(autouse=True)
def http_allowed(settings):
    settings.IDLEGRID_WEBHOOKS_ALLOW_HTTP = True  # these tests are about addresses; https has its own test
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = False


@pytest.fixture
def dns(monkeypatch):
    """dns({"name": ["1.2.3.4"]}): what the resolver answers, per host."""
    answers: dict[str, list[str]] = {}

    def resolve(host, port):
        if host not in answers:
            raise TargetRefused(f"{host} does not resolve")
        return answers[host]

    monkeypatch.setattr(targets, "_addresses", resolve)
    return answers


@pytest.mark.parametrize("url", REFUSED)
def test_private_loopback_link_local_and_other_non_public_targets_are_refused(url):
    with pytest.raises(TargetRefused) as refused:
        target_check(url)
    assert refused.value.fields == {"url": "private address"}


def test_a_public_address_is_a_target_pinned_to_that_address(dns):
    dns["hooks.example.com"] = ["93.184.216.34"]

    target = target_check("https://hooks.example.com/in?x=1")

    assert (target.address, target.port, target.target) == ("93.184.216.34", 443, "/in?x=1")
    assert target.connect_url == "https://93.184.216.34:443/in?x=1"
    assert (target.host_header, target.sni_hostname) == ("hooks.example.com", "hooks.example.com")


def test_a_name_with_any_private_address_is_refused(dns):
    dns["mixed.example.com"] = ["93.184.216.34", "10.0.0.7"]

    with pytest.raises(TargetRefused, match="10.0.0.7"):
        target_check("https://mixed.example.com/")


def test_a_name_that_does_not_resolve_is_refused(dns):
    with pytest.raises(TargetRefused, match="does not resolve"):
        target_check("https://nowhere.example.com/")


@pytest.mark.parametrize("url, why", [
    ("ftp://93.184.216.34/", "scheme"), ("file:///etc/passwd", "scheme"), ("gopher://93.184.216.34/", "scheme"),
    ("https://user:pw@93.184.216.34/", "credentials"), ("https:///path", "host"), ("https://93.184.216.34:99999/", "invalid"),
    ("https://93.184.216.34/a b", "invalid"),
])
def test_only_plain_http_and_https_urls_without_credentials(url, why):
    with pytest.raises(TargetRefused) as refused:
        target_check(url)
    assert refused.value.fields == {"url": why}


def test_production_requires_https_unless_allowed(settings):
    settings.IDLEGRID_WEBHOOKS_ALLOW_HTTP = False

    with pytest.raises(TargetRefused, match="https"):
        target_check("http://93.184.216.34/")
    assert target_check("https://93.184.216.34/").address == "93.184.216.34"


def test_the_setting_allows_loopback_receivers(settings):
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = True

    assert target_check("http://127.0.0.1:8000/hook").address == "127.0.0.1"
    assert target_check("http://[::1]/").connect_url == "http://[::1]:80/"


def test_registration_refuses_a_private_target(submitter):
    with pytest.raises(TargetRefused):
        endpoint_create(owner_id=submitter.pk, url="http://169.254.169.254/latest/meta-data/")
    assert not Endpoint.objects.exists()


def test_a_change_of_url_is_checked_too(submitter, dns):
    dns["hooks.example.com"] = ["93.184.216.34"]
    endpoint = endpoint_create(owner_id=submitter.pk, url="https://hooks.example.com/")

    with pytest.raises(TargetRefused):
        endpoint_update(endpoint=endpoint, url="http://10.0.0.1/")


def test_a_name_that_moves_to_a_private_address_after_registration_is_refused_at_the_attempt(submitter, dns):
    """DNS rebinding: public when registered, loopback when sent. Nothing leaves; the attempt is logged."""
    dns["rebind.example.com"] = ["93.184.216.34"]
    endpoint = endpoint_create(owner_id=submitter.pk, url="https://rebind.example.com/hook")
    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})
    dns["rebind.example.com"] = ["127.0.0.1"]

    assert delivery_attempt(delivery_id=Delivery.objects.get(endpoint=endpoint).pk) == "retry"

    attempt = Delivery.objects.get(endpoint=endpoint).attempts.get()
    assert (attempt.outcome, attempt.address) == ("refused", "")
    assert "127.0.0.1" in attempt.error


def test_the_attempt_connects_to_the_checked_address_with_the_real_host_name(
        submitter, dns, receiver, settings):
    """The connection goes to the address the check saw, whatever a second lookup would say: a resolver
    asked again by the HTTP client could be answered otherwise (rebinding)."""
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = True
    dns["receiver.test"] = ["127.0.0.1"]
    endpoint = endpoint_create(owner_id=submitter.pk, url=f"http://receiver.test:{receiver.port}/hooks")
    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})

    assert delivery_attempt(delivery_id=Delivery.objects.get(endpoint=endpoint).pk) == "succeeded"

    assert receiver.received[0].headers["host"] == f"receiver.test:{receiver.port}"
    assert receiver.received[0].path == "/hooks"


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("169.254.1.1", "link-local"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_address_refusal_names_the_reason(address, why):
    assert address_refusal(address) == why
