"""Theory of operation: which headers cross the proxy, in each direction.

Pure functions over multidicts, no I/O. Hop-by-hop headers (RFC 9110 7.6.1) and every header
named in ``Connection`` are connection-scoped and never forwarded. ``X-Forwarded-*`` describe
the client as this proxy saw it: values arriving from clients are replaced, unless the peer is a
trusted proxy, in which case the peer is appended to the chain (as Traefik and Caddy do).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping

from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
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


def _connection_scoped(headers: Mapping[str, str]) -> frozenset[str]:
    values = headers.getall("Connection", ())  # type: ignore[attr-defined]
    return _scoped_by(tuple(values)) if values else HOP_BY_HOP_HEADERS


@functools.lru_cache(maxsize=64)  # a handful of values ("keep-alive", "close") recur endlessly
def _scoped_by(values: tuple[str, ...]) -> frozenset[str]:
    named = {token.strip().lower() for value in values for token in value.split(",")}
    return HOP_BY_HOP_HEADERS | named


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    peer: str | None,
    scheme: str,
    backend_host: str,
    preserve_host: bool,
    trusted_proxies: tuple[Network, ...],
    drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """The headers to send upstream for a request that arrived with ``incoming``."""
    out = _without(incoming, _connection_scoped(incoming), drop)
    client_host = incoming.get("Host", "")
    if peer_in(peer, trusted_proxies):
        chain = ", ".join(incoming.getall("X-Forwarded-For", ()))
        out["X-Forwarded-For"] = f"{chain}, {peer}" if chain else (peer or "")
        out.setdefault("X-Forwarded-Proto", scheme)
        out.setdefault("X-Forwarded-Host", client_host)
    else:
        out.popall("Forwarded", None)
        out["X-Forwarded-For"] = peer or ""
        out["X-Forwarded-Proto"] = scheme
        out["X-Forwarded-Host"] = client_host
    if not client_host:
        del out["X-Forwarded-Host"]
    if not preserve_host or not client_host:
        out["Host"] = backend_host
    return out


def downstream_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The backend's response headers as the client should see them (Set-Cookie all kept)."""
    return _without(incoming, _connection_scoped(incoming))


def _without(incoming: CIMultiDictProxy[str], *names: Iterable[str]) -> CIMultiDict[str]:
    # A copy minus a dozen names is cheaper than filtering every header (all C calls).
    out = incoming.copy()
    for group in names:
        for name in group:
            if name in out:
                del out[name]
    return out


def origin_form(raw_target: str) -> str | None:
    """The request target to send upstream: origin-form ("/path?query") or None if unusable.

    Absolute-form targets ("http://host/path", RFC 9112 3.2.2) keep only their path and query;
    the backend is ours to choose, never the client's. Asterisk-form and anything else is None.
    """
    if raw_target.startswith("/"):
        return raw_target
    scheme, sep, rest = raw_target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    start = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[start:]
    if not target.startswith("/"):
        target = "/" + target
    return target


def serialize_head(first_line: str, headers: CIMultiDict[str]) -> bytes:
    """A request or status line and headers, ready to write. Every part came through aiohttp's
    parsers (or from our own code), so none can hold CR or LF."""
    if first_line.isascii() and "".join(headers.values()).isascii():
        return _serialize_headers(first_line, headers)  # aiohttp's, in C
    # Non-ASCII: the parsers kept bytes that are not UTF-8 as surrogates, which aiohttp's
    # serializer would drop; encoding them back passes on the sender's very bytes.
    lines = [first_line + "\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
