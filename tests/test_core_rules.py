"""Cookie codec, header rules and health verdicts: pure functions, property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from stickylb.affinity import StickyCookie, backend_token
from stickylb.config import CookieConfig
from stickylb.headers import downstream_headers, parse_networks, upstream_headers
from stickylb.health_rules import ResponseRule, parse_status_ranges


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


def proxy(headers):
    return CIMultiDictProxy(CIMultiDict(headers))


header_names = st.sampled_from(
    [
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Transfer-Encoding",
        "X-A",
        "X-B",
        "Cookie",
        "X-Forwarded-For",
        "Host",
        "Proxy-Authorization",
    ]
)


@given(st.lists(st.tuples(header_names, st.text(alphabet="abc, -", max_size=12)), max_size=10))
def test_upstream_headers_never_forward_hop_by_hop(pairs):
    incoming = proxy(pairs)
    out = upstream_headers(
        incoming,
        peer="10.0.0.1",
        scheme="http",
        backend_host="b:1",
        preserve_host=False,
        trusted_proxies=(),
    )
    named = {t.strip().lower() for v in incoming.getall("Connection", ()) for t in v.split(",")}
    for name in out:
        assert name.lower() not in {
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "transfer-encoding",
            "proxy-authorization",
        }
        assert name.lower() not in named or name.lower() in {
            "x-forwarded-for",
            "host",
            "x-forwarded-proto",
            "x-forwarded-host",
        }
    assert out.getall("X-Forwarded-For") == ["10.0.0.1"]
    assert out["Host"] == "b:1"


def test_trusted_proxy_chain_and_untrusted_replacement():
    incoming = proxy([("X-Forwarded-For", "1.1.1.1"), ("Host", "h")])
    trusted = parse_networks(["10.0.0.0/8"])
    out = upstream_headers(
        incoming,
        peer="10.1.2.3",
        scheme="https",
        backend_host="b",
        preserve_host=True,
        trusted_proxies=trusted,
    )
    assert out["X-Forwarded-For"] == "1.1.1.1, 10.1.2.3"
    assert out["Host"] == "h"
    out = upstream_headers(
        incoming,
        peer="192.0.2.1",
        scheme="https",
        backend_host="b",
        preserve_host=False,
        trusted_proxies=trusted,
    )
    assert out["X-Forwarded-For"] == "192.0.2.1"
    assert out["X-Forwarded-Proto"] == "https"


def test_downstream_keeps_every_set_cookie():
    incoming = proxy(
        [
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
        ]
    )
    out = downstream_headers(incoming)
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "Connection" not in out and "Transfer-Encoding" not in out


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
