"""Egress policy: which addresses notifyd may connect to on a tenant's behalf.

A tenant's admin chooses its own SMTP relay, host and port. Without a policy that choice
reaches whatever the daemon's network reaches: loopback services, the private network, the
cloud's link-local metadata address, any port; with the outcome coming back in `last_error`,
notifyd was a port scanner and a way in to internal relays that trust their network.

The rule, for every address a tenant relay's host resolves to:
- an address inside `NOTIFYD_EGRESS_ALLOWED_NETWORKS` is allowed, at any port: the operator
  vouched for that network (an internal relay on port 10025, say);
- any other special address (loopback, private, link-local, multicast, reserved, shared
  CGNAT, `0.0.0.0/8`, and the same inside an IPv4-mapped, NAT64 or 6to4 IPv6 address) is
  refused;
- a public address is allowed on the ports of `NOTIFYD_EGRESS_ALLOWED_PORTS` only.

Every address must pass, not just one: a name that mixes a public and an internal address
is refused whole, so the answer does not depend on which address a resolver lists first,
and the check when settings are saved says the same as the check at connection time.

`connect` resolves, checks, and opens the socket to a checked address itself: the name is
never resolved a second time by someone else (aiosmtplib, the OS), which is what keeps DNS
rebinding (a public answer when the settings are saved, `127.0.0.1` later) from getting
around the check. TLS still verifies the certificate against the name.

The operator's own endpoints (`EMAIL_*`, `TWILIO_API_BASE_URL`) are not a tenant's choice
and are not subject to this policy.

What a tenant is told names the kind of address, never the address a name resolved to: the
resolver may answer from the operator's internal DNS, which is not the tenant's to read.
`EgressRefused.address` has it, for the operator's log line the callers write.

Lookups run on threads of the policy's own (`NOTIFYD_EGRESS_RESOLVE_THREADS`), not on the
loop's shared executor: a tenant whose DNS never answers holds a thread past our deadline
(getaddrinfo cannot be interrupted), and on the shared one it would hold up the operator's
relay, Twilio and every other lookup of the daemon.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult

from notifyd.settings import EGRESS_DEFAULT_PORTS, Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port → its addresses in the resolver's order; the system's by default, tests pass
# their own (an answer that changes between two calls is DNS rebinding)
Resolver = Callable[[str, int], Awaitable[list[Address]]]

NETWORKS_SETTING = "NOTIFYD_EGRESS_ALLOWED_NETWORKS"
PORTS_SETTING = "NOTIFYD_EGRESS_ALLOWED_PORTS"

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT; not is_private in 3.11
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


class EgressRefused(Exception):
    """The policy refuses a tenant's relay; the message, for the tenant, says why and how an
    operator may allow it. `field` is the setting at fault (`host` or `port`); `address`, the
    address refused, is for the operator's log only."""

    def __init__(self, field: str, message: str, address: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.address = address


class ResolveFailed(Exception):
    """The host name did not resolve (no such name, DNS failure, or past the deadline)."""


class Blocked(OSError):
    """`EgressRefused` or `ResolveFailed` as an HTTP client's resolver must raise it (an
    `OSError`: aiohttp wraps it in `ClientConnectorDNSError`, whose `os_error` it is)."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(str(reason))
        self.reason = reason


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to its destination: IPv4-mapped (`::ffff:a.b.c.d`),
    NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`); None for any other address."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _kind(address: Address) -> str | None:
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address in _THIS_NETWORK:
        return "a 'this network' (0.0.0.0/8) address"
    if any(address in network for network in _PRIVATE):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private or not address.is_global:
        # documentation, benchmarking, Teredo, ... (Python's own special-purpose lists)
        return "a special-purpose address"
    return None


def special_kind(address: Address) -> str | None:
    """What makes an address special ("a loopback address", ...), None for a public one.

    An IPv6 address that carries an IPv4 one is judged by the IPv4 address it leads to:
    Python 3.11 calls `::ffff:127.0.0.1` not loopback and `::ffff:8.8.8.8` reserved, and
    a NAT64 address (reserved in 3.11 too) leads to a public host as often as to a private
    one.
    """
    inner = embedded_ipv4(address)
    if inner is None:
        return _kind(address)
    kind = _kind(inner)
    return None if kind is None else f"{kind} inside an IPv6 address"


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


class Egress:
    """The policy for tenants' own relays. `allowed_ports` empty: any port. `resolver`: the
    system's (getaddrinfo on `resolve_threads` threads of its own) unless a test gives one;
    `close()` stops those threads."""

    def __init__(
        self,
        *,
        allowed_networks: tuple[Network, ...] = (),
        allowed_ports: tuple[int, ...] = EGRESS_DEFAULT_PORTS,
        resolve_timeout: float = 3.0,
        resolve_threads: int = 4,
        resolver: Resolver | None = None,
    ) -> None:
        self.allowed_networks = allowed_networks
        self.allowed_ports = allowed_ports
        self.port_kind = "an SMTP port"
        self.resolve_timeout = resolve_timeout
        self._resolver = resolver or self._system_resolve
        # threads start on first use: a policy that only judges literals starts none
        self._threads = ThreadPoolExecutor(resolve_threads, thread_name_prefix="notifyd-egress")

    @classmethod
    def from_settings(cls, settings: Settings, resolver: Resolver | None = None) -> Egress:
        return cls(
            allowed_networks=settings.egress_allowed_networks,
            allowed_ports=settings.egress_allowed_ports,
            resolve_timeout=settings.egress_resolve_timeout,
            resolve_threads=settings.egress_resolve_threads,
            resolver=resolver,
        )

    def for_ports(self, allowed_ports: tuple[int, ...], port_kind: str) -> Egress:
        """The same policy (networks, resolver, lookup threads) for another kind of service:
        webhooks' HTTP ports rather than SMTP's. The copy shares the threads; only the
        original's `close()` stops them."""
        other = copy.copy(self)
        other.allowed_ports = allowed_ports
        other.port_kind = port_kind
        return other

    def close(self) -> None:
        """Stop the lookup threads (one still inside getaddrinfo ends when that returns)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _system_resolve(self, host: str, port: int) -> list[Address]:
        """getaddrinfo (the OS resolver: /etc/hosts, DNS), TCP addresses only, in its order."""
        lookup = functools.partial(
            socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._threads, lookup)
        addresses: list[Address] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        return addresses

    def operator_allowed(self, address: Address) -> bool:
        """Inside one of the operator's networks (an IPv4 one also matches the IPv4 address
        a mapped, NAT64 or 6to4 IPv6 address carries)."""
        inner = embedded_ipv4(address)
        return any(
            address in network or (inner is not None and inner in network)
            for network in self.allowed_networks
        )

    def refusal(self, host: str, address: Address, port: int) -> EgressRefused | None:
        """Why connecting to `address` at `port` for `host` is refused, None if it is not."""
        if self.operator_allowed(address):
            return None
        kind = special_kind(address)
        if kind is not None:
            # a literal is the tenant's own input; the address a name resolved to is not
            said = f"{host} is" if _literal(host) is not None else f"{host} resolves to"
            return EgressRefused(
                "host",
                f"{said} {kind}; an operator may allow it with {NETWORKS_SETTING}",
                str(address),
            )
        if self.allowed_ports and port not in self.allowed_ports:
            ports = ", ".join(map(str, self.allowed_ports))
            return EgressRefused(
                "port",
                f"port {port} is not {self.port_kind} notifyd connects to ({ports}); "
                f"an operator may allow it with {PORTS_SETTING}",
                str(address),
            )
        return None

    async def resolve(self, host: str, port: int) -> list[Address]:
        """`host`'s addresses, within `resolve_timeout`; an IP literal is its own answer."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        try:
            async with asyncio.timeout(self.resolve_timeout):
                addresses = await self._resolver(host, port)
        except TimeoutError:
            raise ResolveFailed(f"{host}: no DNS answer within {self.resolve_timeout:g}s") from None
        except socket.gaierror as exc:
            what = "DNS lookup failed"
            if exc.errno == socket.EAI_NONAME:
                what = "no such host name"
            elif exc.errno == socket.EAI_AGAIN:
                what = "temporary DNS failure"
            raise ResolveFailed(f"{host}: {what}") from None
        except (OSError, UnicodeError, ValueError):
            raise ResolveFailed(f"{host}: DNS lookup failed") from None
        if not addresses:
            raise ResolveFailed(f"{host}: no addresses")
        return addresses

    async def check(self, host: str, port: int) -> list[Address]:
        """`host`'s addresses if every one is allowed, else `EgressRefused` (`ResolveFailed`
        when it does not resolve)."""
        addresses = await self.resolve(host, port)
        for address in addresses:
            refused = self.refusal(host, address, port)
            if refused is not None:
                raise refused
        return addresses

    async def connect(self, host: str, port: int) -> socket.socket:
        """A TCP socket connected to one of `host`'s checked addresses, tried in the
        resolver's order; the caller owns it and bounds the whole in time. Raises
        `EgressRefused`, `ResolveFailed` or the last address's `OSError`."""
        addresses = await self.check(host, port)
        loop = asyncio.get_running_loop()
        failure: OSError = OSError(f"{host}: no address to connect to")
        for address in addresses:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, (str(address), port))
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise failure


class HttpResolver(AbstractResolver):
    """aiohttp's resolver under the policy: every name an HTTP client connects to is
    resolved and checked here, and aiohttp connects to exactly the addresses returned, so the
    name is never resolved again by someone else (no DNS rebinding). aiohttp skips the
    resolver for an IP literal: the caller checks those itself (`Egress.check`)."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self._egress.check(host, port)
        except (EgressRefused, ResolveFailed) as exc:
            raise Blocked(exc) from None
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": socket.IPPROTO_TCP,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        """The policy's threads are its owner's to stop."""
