"""The SSRF guard: which addresses an image fetch may connect to.

A URL from a stranger must not reach the server's own network: loopback, private ranges,
link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, reserved and unspecified
addresses are refused, in IPv4 and IPv6 alike, including IPv6 forms that embed an IPv4
address. The host is resolved once, every address it resolves to is checked, and the fetch
then connects to a checked address, so a second DNS answer cannot slip in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address
# (host, port) -> the addresses it resolves to; tests pass their own to fake DNS answers.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What `inet_aton` accepts: 127.1, 2130706433, 0x7f000001, 0177.0.0.1 all mean loopback.
_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string spells directly, in any spelling a resolver would accept."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, IPv6Address):
        if ip.teredo is not None:
            return False  # a tunnel whose far end we cannot check
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    # `is_global` alone lets multicast through (224.0.0.0/4 is not in the private list).
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # Scope ids (fe80::1%eth0) are dropped: they only ever appear on non-public addresses.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


class AddressPolicy:
    """Allowlist-aware check of a host and the addresses it resolved to."""

    def __init__(self, allow: list[str]):
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def allows(self, host: str, ip: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        if any(ip in net for net in self.networks if net.version == ip.version):
            return True
        return is_public(ip)
