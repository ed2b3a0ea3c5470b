"""The config loader: typed models, defaults, aliases; arbitrary input never crashes it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stickylb.config import Config, ConfigError, build_config, load_config
from stickylb.durations import parse_duration, parse_size

BASE = {"port": 3001, "backends": [{"id": 0, "url": "http://127.0.0.1:5000"}]}


def test_defaults_follow_the_node_package():
    config = build_config(BASE)
    assert config.strategy == "round-robin"
    assert config.health.interval == 10.0 and config.health.timeout == 2.0
    assert config.health.path == "/" and config.health.method == "GET"
    assert config.backends[0].weight == 1
    assert config.cookie.http_only and config.cookie.same_site == "Lax"
    assert config.backend_header is True and config.sticky is True


def test_per_backend_overrides_win_over_global_over_defaults():
    config = build_config(
        {
            **BASE,
            "health": {"path": "/health", "timeout": 3000, "headers": {"X": "1"}},
            "backends": [
                {"id": 0, "url": "http://a", "healthPath": "/ready", "healthMethod": "head"},
                {"id": 1, "url": "http://b"},
            ],
        }
    )
    first, second = (config.health_for(b) for b in config.backends)
    assert (first.path, first.method, first.timeout) == ("/ready", "HEAD", 3.0)
    assert (second.path, second.method) == ("/health", "GET")
    assert dict(second.headers) == {"X": "1"}


def test_python_callable_check_is_accepted():
    def check(backend):
        return True

    config = build_config({**BASE, "health": {"check": check}})
    assert config.health_for(config.backends[0]).check is check


def test_config_is_frozen():
    config = build_config(BASE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type varies
        config.port = 1  # type: ignore[misc]


def test_durations_and_sizes():
    assert parse_duration(1500) == 1.5
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    assert parse_size("16MiB") == 16 * 1024 * 1024
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_duration(True)


def test_email_service_maps_to_smtp_settings():
    config = build_config(
        {**BASE, "email": {"service": "gmail", "auth": {"user": "u@x", "pass": "p"}}}
    )
    assert config.email is not None
    assert (config.email.smtp_host, config.email.smtp_port, config.email.smtp_security) == (
        "smtp.gmail.com",
        465,
        "tls",
    )
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "email": {"service": "pigeon"}})
    assert "email.service: unknown service 'pigeon'" in err.value.problems[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "port",
                    "backends",
                    "id",
                    "url",
                    "weight",
                    "health",
                    "interval",
                    "strategy",
                    "cookie",
                    "email",
                    "auth",
                    "pass",
                    "timeouts",
                    "x",
                    "healthPath",
                    "admin",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_gives_a_config_or_field_named_errors(value):
    data = value if isinstance(value, dict) else {"port": value}
    try:
        config = build_config(data)
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert ": " in line and "Traceback" not in line
    else:
        assert isinstance(config, Config)


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(BASE))
    assert load_config(path).port == 3001
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        load_config(path)
