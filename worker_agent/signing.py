"""The device's Ed25519 identity: key files, the enrolment proof and result signatures."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import protocol


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return protocol.b64encode(raw)


def key_to_pem(key: Ed25519PrivateKey) -> bytes:
    # Unencrypted: a daemon must start unattended; the file's 0600 mode is the protection.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the device key is not an Ed25519 private key")
    return key


def enroll_proof(key: Ed25519PrivateKey, *, token: str) -> str:
    message = protocol.enroll_message(token=token, public_key_b64=public_key_b64(key))
    return protocol.b64encode(key.sign(message))


def sign_result(
    key: Ed25519PrivateKey, *, result_id: int, unit_id: int, device_id: int, output_sha256: str
) -> str:
    message = protocol.result_message(
        result_id=result_id, unit_id=unit_id, device_id=device_id, output_sha256=output_sha256
    )
    return protocol.b64encode(key.sign(message))
