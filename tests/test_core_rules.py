"""Cookie codec, header rules and health verdicts: pure functions, property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stickylb.config import CookieConfig
from stickylb.core.affinity import StickyCookie, backend_token
from stickylb.core.headers import (
    FORWARDING_HEADERS,
    Forwarding,
    header_lines,
    not_forwarded,
    parse_networks,
)
from stickylb.core.health_rules import ResponseRule, parse_status_ranges


def test_tokens_are_stable_opaque_and_secret_dependent():
    assert backend_token(0, None) == backend_token(0, None)
    assert backend_token(0, None) != backend_token(1, None)
    assert backend_token(0, "k1") != backend_token(0, "k2")
    assert backend_token(0, None) != backend_token("0", "k")
    assert backend_token(0, None) != "0"


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_cookie_reader_never_raises(header):
    cookie = StickyCookie(CookieConfig())
    value = cookie.read(header)
    assert value is None or isinstance(value, str)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "X-Backend-ID"]),
            st.text(
                alphabet=st.characters(blacklist_characters=";", blacklist_categories=("Cs",)),
                max_size=30,
            ),
        ),
        max_size=5,
    )
)
def test_cookie_reader_finds_first_own_value(pairs):
    header = "; ".join(f"{k}={v}" for k, v in pairs)
    cookie = StickyCookie(CookieConfig())
    own = [v.strip().strip('"') for k, v in pairs if k == "X-Backend-ID"]
    expected = (own[0] or None) if own else None
    assert cookie.read(header) == expected


def test_set_cookie_attributes():
    cookie = StickyCookie(
        CookieConfig(
            name="lb", max_age=60, domain="example.test", same_site="None", http_only=False
        )
    )
    header = cookie.set_cookie_header("tok")
    assert header == "lb=tok; Path=/; Domain=example.test; Max-Age=60; Secure; SameSite=None"


def triples(pairs):
    return [(name.lower().encode(), name.encode(), value.encode()) for name, value in pairs]


def forward(pairs, *, peer, trusted_proxies=(), preserve_host=False, scheme=b"http"):
    """The head ``Forwarding`` writes for a request with these headers, read back as pairs."""
    headers = triples(pairs)
    connection = b",".join(v.lower() for n, _, v in headers if n == b"connection")
    host = next((v for n, _, v in headers if n == b"host"), None)
    rules = Forwarding(preserve_host=preserve_host, trusted_proxies=trusted_proxies)
    head = rules.head(
        b"GET / HTTP/1.1\r\n",
        headers,
        not_forwarded(connection, FORWARDING_HEADERS),
        peer=peer,
        peer_bytes=peer.encode(),
        scheme=scheme,
        client_host=host,
        backend_host=b"b:1",
    )
    assert head.endswith(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:-2]
    return [tuple(part.decode() for part in line.split(b": ", 1)) for line in lines]


def values(pairs, name):
    return [value for key, value in pairs if key.lower() == name.lower()]


header_names = st.sampled_from(
    [
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Transfer-Encoding",
        "Content-Length",
        "X-A",
        "X-B",
        "Cookie",
        "X-Forwarded-For",
        "Host",
        "Proxy-Authorization",
    ]
)


@given(st.lists(st.tuples(header_names, st.text(alphabet="abc, -", max_size=12)), max_size=10))
def test_upstream_headers_never_forward_hop_by_hop_or_framing(pairs):
    out = forward(pairs, peer="10.0.0.1")
    named = {t.strip().lower() for name, v in pairs if name == "Connection" for t in v.split(",")}
    ours = {"x-forwarded-for", "host", "x-forwarded-proto", "x-forwarded-host"}
    for name, _ in out:
        assert name.lower() not in {
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "transfer-encoding",
            "content-length",
            "proxy-authorization",
        }
        assert name.lower() not in named or name.lower() in ours
    assert values(out, "X-Forwarded-For") == ["10.0.0.1"]
    assert values(out, "Host") == ["b:1"]


def test_trusted_proxy_chain_and_untrusted_replacement():
    incoming = [("X-Forwarded-For", "1.1.1.1"), ("Host", "h")]
    trusted = parse_networks(["10.0.0.0/8"])
    out = forward(incoming, peer="10.1.2.3", trusted_proxies=trusted, preserve_host=True)
    assert values(out, "X-Forwarded-For") == ["1.1.1.1, 10.1.2.3"]
    assert values(out, "Host") == ["h"]
    out = forward(incoming, peer="192.0.2.1", trusted_proxies=trusted, scheme=b"https")
    assert values(out, "X-Forwarded-For") == ["192.0.2.1"]
    assert values(out, "X-Forwarded-Proto") == ["https"]
    assert values(out, "X-Forwarded-Host") == ["h"]


def test_answers_keep_every_set_cookie_and_lose_connection_headers():
    incoming = triples(
        [
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
        ]
    )
    out = b"".join(header_lines(incoming, not_forwarded(b"close, x-hop")))
    assert out == b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"


def test_health_rules():
    assert ResponseRule().judge(204) is None
    assert ResponseRule().judge(503) == "status 503"
    assert ResponseRule(algorithm="http").judge(503) is None
    rule = ResponseRule(expect_status=parse_status_ranges("200-399,418"))
    assert rule.judge(302) is None and rule.judge(418) is None and rule.judge(404) == "status 404"
    body_rule = ResponseRule(expect_body='"db":\\s*"ok"')
    assert body_rule.judge(200, '{"db": "ok"}') is None
    assert body_rule.judge(200, '{"db": "down"}') == "body did not match expectBody"
    assert ResponseRule(expect_body="ok").judge(200, "all ok") is None
    assert parse_status_ranges([200, "300-301"]) == ((200, 200), (300, 301))
