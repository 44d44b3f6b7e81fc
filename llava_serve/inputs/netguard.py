"""The SSRF guard: which addresses an image fetch may connect to.

A URL from a stranger must not reach the server's own network: loopback, private ranges,
link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, reserved and unspecified
addresses are refused, in IPv4 and IPv6 alike, including IPv6 forms that embed an IPv4
address. The ranges are listed here, from IANA's IPv4 and IPv6 special-purpose address
registries, rather than taken from `ipaddress`, whose tables change between patch releases
(3.11.7 calls 192.0.0.192 and fec0::/10 global). The host is resolved once, every address it
resolves to is checked, and the fetch then connects to a checked address, so a second DNS
answer cannot slip in between.
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
# IANA's special-purpose registries (and multicast), whole blocks: the few entries inside them
# marked globally reachable (anycast relays, ORCHID, AS112) are never where an image lives.
_SPECIAL_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared (CGNAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.31.196.0/24",  # AS112
        "192.52.193.0/24",  # AMT
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "192.175.48.0/24",  # direct delegation AS112
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
]
# IPv6 unicast on the Internet is 2000::/3; everything outside it is refused, and these inside it.
_GLOBAL_V6 = ipaddress.ip_network("2000::/3")
_SPECIAL_V6 = [
    ipaddress.ip_network(n)
    for n in (
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, AMT, ...)
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4 (checked by its embedded IPv4 address first)
        "3fff::/20",  # documentation
    )
]
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
        return ip in _GLOBAL_V6 and not any(ip in net for net in _SPECIAL_V6)
    return not any(ip in net for net in _SPECIAL_V4)


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

    def listed(self, host: str, ip: IPAddress) -> bool:
        """Whether the operator named this host or its network (`images.allow_hosts`)."""
        if host.lower().rstrip(".") in self.hosts:
            return True
        return any(ip in net for net in self.networks if net.version == ip.version)

    def allows(self, host: str, ip: IPAddress) -> bool:
        return self.listed(host, ip) or is_public(ip)
