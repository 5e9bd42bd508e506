"""Pinning over TLS: the attempt connects to the checked address while TLS sends the URL's host name (SNI)
and checks the certificate against it, so pinning the address costs no certificate check."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from marketplace.webhooks import catalog, delivery, targets
from marketplace.webhooks.models import Delivery
from marketplace.webhooks.services import endpoint_create, event_emit


def certificate(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls_receiver(tmp_path, monkeypatch, settings):
    """An HTTPS receiver on 127.0.0.1 whose certificate names receiver.test, trusted by the sender; DNS says
    receiver.test is 127.0.0.1 (loopback allowed); records the SNI name each connection sent."""
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = True
    cert_file, key_file = certificate(tmp_path, "receiver.test")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_tls = ssl.create_default_context(cafile=str(cert_file))
    monkeypatch.setattr(delivery, "_tls", lambda: client_tls)
    monkeypatch.setattr(targets, "_addresses", lambda host, port: ["127.0.0.1"])
    yield server.server_address[1], names
    server.shutdown()
    server.server_close()


def attempt(owner, url):
    endpoint = endpoint_create(owner_id=owner.pk, url=url)
    event_emit(owner_id=owner.pk, type=catalog.JOB_COMPLETED, data={})
    row = Delivery.objects.get(endpoint=endpoint)
    return delivery.delivery_attempt(delivery_id=row.pk), row.attempts.get()


def test_the_pinned_address_is_reached_with_the_names_sni_and_certificate_check(tls_receiver, submitter):
    port, names = tls_receiver

    outcome, logged = attempt(submitter, f"https://receiver.test:{port}/hooks")

    assert (outcome, logged.status_code, logged.address) == ("succeeded", 204, "127.0.0.1")
    assert names == ["receiver.test"]


def test_a_certificate_for_another_name_fails_the_attempt(tls_receiver, submitter):
    """DNS pointing another name at this server (or rebinding to it) does not pass TLS: the name is checked."""
    port, _ = tls_receiver

    outcome, logged = attempt(submitter, f"https://elsewhere.test:{port}/hooks")

    assert (outcome, logged.outcome, logged.status_code) == ("retry", "connection_error", None)
    assert "certificate" in logged.error.lower() or "ssl" in logged.error.lower()
