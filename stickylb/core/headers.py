"""Theory of operation: which headers cross the proxy, in each direction, and how a head is
written.

Pure functions over bytes, no I/O. Headers travel as the parser gave them: ``(lower-case name,
name, value)`` triples, the name's own spelling and every byte of the value kept (a value that
is not UTF-8 reaches the other side unchanged). Hop-by-hop headers (RFC 9110 7.6.1) and every
header named in ``Connection`` are connection-scoped and never forwarded; framing headers
(``Content-Length``, ``Transfer-Encoding``) are never copied either: each side of the proxy
gets the framing stickylb writes for it.

``X-Forwarded-*`` describe the client as this proxy saw it: values arriving from clients are
replaced, unless the peer is a trusted proxy, in which case the peer is appended to the chain
(as Traefik and Caddy do).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

Header = tuple[bytes, bytes, bytes]  # lower-case name, name as sent, value

HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# The proxy writes these itself (towards a backend), from what it saw of the client.
FORWARDING_HEADERS = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def peer_in(peer: str | None, networks: tuple[Network, ...]) -> bool:
    if not peer or not networks:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def original_client(
    peer: str | None, forwarded_for: Iterable[bytes | str], trusted: tuple[Network, ...]
) -> str | None:
    """Who sent the request: ``peer``, unless it is a trusted proxy; then the right-most
    address of ``X-Forwarded-For`` that is not one (as nginx's ``real_ip_recursive``). A
    value that is not an address ends the walk: nothing left of it can be believed."""
    if not peer_in(peer, trusted):
        return peer
    chain: list[str] = []
    for value in forwarded_for:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        chain += (part.strip() for part in text.split(","))
    client = peer
    for address in reversed(chain):
        try:
            ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            break
        client = address
        if not peer_in(address, trusted):
            break
    return client


@functools.lru_cache(maxsize=256)  # a handful of values ("keep-alive", "close") recur endlessly
def not_forwarded(connection: bytes, also: frozenset[bytes] = frozenset()) -> frozenset[bytes]:
    """Names that must not cross the proxy, given the ``Connection`` values (lower-cased,
    joined with commas): hop-by-hop, framing, whatever ``Connection`` names, and ``also``."""
    named = {token.strip() for token in connection.split(b",")} - {b""}
    return HOP_BY_HOP_HEADERS | FRAMING_HEADERS | named | also


def tokens(value: bytes) -> frozenset[bytes]:
    """The comma-separated tokens of a header value, lower-cased."""
    return frozenset(token.strip() for token in value.lower().split(b",")) - {b""}


class Forwarding:
    """How a request's headers are rewritten for a backend, settled once per config."""

    def __init__(self, *, preserve_host: bool, trusted_proxies: tuple[Network, ...]) -> None:
        self._preserve_host = preserve_host
        self._trusted = trusted_proxies

    @property
    def any_trusted(self) -> bool:
        return bool(self._trusted)

    @property
    def trusted(self) -> tuple[Network, ...]:
        return self._trusted

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` is one of our trusted proxies."""
        return bool(self._trusted) and peer_in(peer, self._trusted)

    def head(
        self,
        request_line: bytes,
        headers: Sequence[Header],
        skip: frozenset[bytes],
        *,
        peer: str | None,
        peer_bytes: bytes,
        scheme: bytes,
        client_host: bytes | None,
        backend_host: bytes,
        extra: bytes = b"",
    ) -> bytes:
        """The request head for a backend: ``request_line`` (with its CRLF), the client's
        headers minus ``skip`` (which holds ``FORWARDING_HEADERS``: see ``not_forwarded``),
        the forwarding headers, then ``extra`` (whole header lines, such as the framing), then
        the blank line."""
        out = [request_line]
        for lname, name, value in headers:
            if lname not in skip:
                out += (name, b": ", value, b"\r\n")
        chain, proto, host = peer_bytes, scheme, client_host
        if self._trusted and peer_in(peer, self._trusted):  # a proxy of ours: append to it
            sent: dict[bytes, list[bytes]] = {}
            for lname, _, value in headers:
                if lname in FORWARDING_HEADERS:
                    sent.setdefault(lname, []).append(value)
            chain = b", ".join([*sent.get(b"x-forwarded-for", ()), peer_bytes])
            proto = sent.get(b"x-forwarded-proto", [scheme])[0]
            host = sent.get(b"x-forwarded-host", [client_host or b""])[0]
            for value in sent.get(b"forwarded", ()):
                out += (b"Forwarded: ", value, b"\r\n")
        out += (b"X-Forwarded-For: ", chain, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
        if host:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
        own_host = client_host if self._preserve_host and client_host else backend_host
        out += (b"Host: ", own_host, b"\r\n", extra, b"\r\n")
        return b"".join(out)


def header_lines(headers: Iterable[Header], skip: frozenset[bytes]) -> list[bytes]:
    """The headers not in ``skip``, as parts of header lines ready to join."""
    out: list[bytes] = []
    for lname, name, value in headers:
        if lname not in skip:
            out += (name, b": ", value, b"\r\n")
    return out
