"""The SSRF guard: a webhook may only reach the public internet, unless the operator's allowlist says otherwise.

Checked twice. At submit (``check_url``) a client learns at once that its URL is refused; at every send
(``vetted_addresses``) the host is resolved again and the sender connects to an address vetted here, never to a
name, so a DNS answer that changes between the check and the connection (rebinding) gains nothing.

Refused: schemes other than https (http only to hosts on the allowlist), credentials in the URL, over-long URLs,
names that do not resolve, and any name with at least one address that is not public: loopback, private (RFC
1918, unique-local fc00::/7), link-local (cloud metadata lives there: 169.254.169.254, and AWS's fd00:ec2::254),
shared address space, multicast, unspecified, reserved or documentation ranges, and the same addresses written
as IPv4-mapped, 6to4 or NAT64 IPv6. The allowlist (``--webhook-allow``) names hosts, addresses or CIDR networks;
a host on it may resolve anywhere, an address may be reached when it or a network holding it is listed.

Messages name the reason and the address a client gave, never what its name resolved to (that would tell a
client what the server's resolver answers for internal names) nor anything else about the server.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from sdasync.errors import RequestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FIELD = "webhook"
MAX_URL_CHARS = 2048
#: Cloud instance metadata: link-local, so refused anyway, but named so the message says what it is.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not global, not "private" in Python 3.11
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart, as the sender needs it."""

    scheme: str
    #: Lower-case, without a trailing dot; IPv6 literals without brackets.
    host: str
    port: int
    #: Path and query, as sent in the request line.
    target: str


@dataclass(frozen=True)
class Allowlist:
    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Entries are host names, addresses or CIDR networks; anything else is a name."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            item = entry.strip().lower().rstrip(".")
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                names.add(item)
        return cls(frozenset(names), tuple(networks))

    def lists_address(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def lists_host(self, host: str) -> bool:
        if host in self.names:
            return True
        literal = _literal(host)
        return literal is not None and self.lists_address(literal)


def _refuse(message: str) -> RequestError:
    return RequestError(f"webhook refused: {message}", field=FIELD)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped ::ffff:a.b.c.d, 6to4, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def why_not_public(address: IPAddress) -> str | None:
    """Why a webhook may not reach ``address`` (a few words), or None when it is public."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = why_not_public(embedded)
            return None if reason is None else f"{reason} (written as IPv6)"
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("shared address space", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
              ("private", address.is_private), ("reserved", address.is_reserved),
              # Deprecated, but routed inside some networks still: never the public internet.
              ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
              ("not globally routable", not address.is_global))
    for reason, hit in checks:
        if hit:
            return f"a {reason} address" if reason != "not globally routable" else reason
    return None


def parse_url(url: str, allow: Allowlist) -> Target:
    """Check what a URL says by itself (no DNS). Raises RequestError (field ``webhook``)."""
    if not isinstance(url, str) or not url:
        raise _refuse("the URL is empty")
    if len(url) > MAX_URL_CHARS:
        raise _refuse(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _refuse("the URL holds whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("the URL is malformed (bad host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in {"https", "http"}:
        raise _refuse("only https URLs are accepted")
    if "@" in parts.netloc:
        raise _refuse("credentials in the URL are not accepted; the payload is signed instead")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse("the URL has no host")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise _refuse("the host name is not a valid internationalized name") from None
    if scheme == "http" and not allow.lists_host(host):
        raise _refuse("only https URLs are accepted (plain http only to hosts the operator allows)")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if not target.isascii():
        # http.client sends ASCII only: such a URL would pass here and fail every try for a day.
        raise _refuse("the webhook URL's path and query must be ASCII (percent-encode the rest)")
    return Target(scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), target=target)


#: For a name: one message whether it does not resolve or resolves somewhere private, so a client cannot map
#: which internal names exist (the message also lands in the tenant's delivery log).
NOT_REACHABLE = "{host} is not a reachable public address"


def vetted_addresses(host: str, port: int, allow: Allowlist | frozenset[str]) -> list[IPAddress]:
    """Every address ``host`` resolves to, once all are vetted; the sender connects only to these. Raises
    RequestError (field ``webhook``) when the name does not resolve or any of its addresses is refused: one bad
    address refuses the name, since a resolver may hand out any of them on the next lookup."""
    rules = allow if isinstance(allow, Allowlist) else Allowlist.parse(allow)
    literal = _literal(host)
    if literal is not None:
        found: list[IPAddress] = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise _refuse(NOT_REACHABLE.format(host=host)) from None
        found = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if address not in found:
                found.append(address)
        if not found:
            raise _refuse(NOT_REACHABLE.format(host=host))
    if rules.lists_host(host):
        return found
    for address in found:
        reason = why_not_public(address)
        if reason is not None and not rules.lists_address(address):
            if literal is not None:
                raise _refuse(f"{host} is {reason}")
            raise _refuse(NOT_REACHABLE.format(host=host))
    return found


def check_url(url: str, allow: frozenset[str]) -> None:
    """Refuse a webhook URL at submit time: RequestError (field ``webhook``) naming the reason."""
    rules = Allowlist.parse(allow)
    target = parse_url(url, rules)
    vetted_addresses(target.host, target.port, rules)
