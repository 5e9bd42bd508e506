"""Where a webhook may be sent: the SSRF rules.

A receiver's URL is the submitter's to choose, and the marketplace POSTs to it from inside its own network:
unchecked, `http://169.254.169.254/...` (a cloud's metadata service), `http://127.0.0.1:6379/` or
`http://10.0.0.5/admin` would be requests by us to what only we can reach. So a URL's host is resolved and
refused if any of its addresses is not a public unicast address (loopback, private, link-local, CGNAT,
multicast, reserved, unspecified; an IPv4 address inside IPv6 -- mapped, 6to4, NAT64 -- is judged as that IPv4
address). It is checked when the endpoint is registered or changed, and again before every attempt (DNS
changes), and the attempt connects to the very address that was checked (`Target.connect_url`, with the
Host header and TLS SNI of the real name): a DNS answer that changes between the check and the connection
(rebinding) cannot send us elsewhere. Redirects are never followed (an answer's Location would be an
unchecked URL). Only http and https; plain http only where IDLEGRID_WEBHOOKS_ALLOW_HTTP (off in production).
IDLEGRID_WEBHOOKS_ALLOW_PRIVATE lifts the address rules (tests and the demo send to loopback receivers).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from marketplace.core.exceptions import ValidationFailed

DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValidationFailed):
    code = "webhook_target_refused"


@dataclass(frozen=True)
class Target:
    url: str  # as registered
    scheme: str
    host: str  # the name, ASCII (IDNA)
    port: int
    address: str  # the checked IP address the attempt connects to
    target: str  # path and query

    @property
    def connect_url(self) -> str:
        ip = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{ip}:{self.port}{self.target}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def sni_hostname(self) -> str | None:
        """The name TLS sends and checks the certificate for; None for an IP literal (checked as the IP)."""
        return None if _literal(self.host) else self.host


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _addresses(host: str, port: int) -> list[str]:
    """The addresses a name resolves to, for TCP (tests replace this to play DNS)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"{host} does not resolve: {exc}", fields={"url": "does not resolve"}) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(address: str) -> str | None:
    """Why we never send to this address, or None for a public unicast one."""
    ip: IP = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            ip = embedded
        elif ip.teredo:
            ip = ip.teredo[1]
    for flag in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):  # most telling first
        if getattr(ip, f"is_{flag}"):
            return flag.replace("_", "-")
    return None if ip.is_global else "not public"


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a URL: {exc}", fields={"url": "invalid"}) from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise TargetRefused("a webhook URL is http:// or https://", fields={"url": "scheme"})
    if scheme == "http" and not settings.IDLEGRID_WEBHOOKS_ALLOW_HTTP:
        raise TargetRefused("a webhook URL must be https://", fields={"url": "scheme"})
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("a webhook URL carries no user or password", fields={"url": "credentials"})
    if not parts.hostname:
        raise TargetRefused("a webhook URL names a host", fields={"url": "host"})
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise TargetRefused("the host is not a valid name", fields={"url": "host"}) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(ord(c) < 33 or ord(c) == 127 for c in target):
        raise TargetRefused("the URL holds spaces or control characters", fields={"url": "invalid"})
    return scheme, host, port or DEFAULT_PORTS[scheme], target


def target_check(url: str) -> Target:
    """The URL's target, resolved and checked (module docstring); TargetRefused if we may not send there."""
    scheme, host, port, target = _split(url)
    literal = _literal(host)
    addresses = [str(literal)] if literal is not None else _addresses(host, port)
    if not addresses:
        raise TargetRefused(f"{host} has no address", fields={"url": "does not resolve"})
    if not settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE:
        for address in addresses:
            why = address_refusal(address)
            if why:
                raise TargetRefused(f"{host} resolves to {address}, a {why} address: webhooks go to public addresses only",
                                    fields={"url": "private address"})
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0].split("%", 1)[0], target=target)
