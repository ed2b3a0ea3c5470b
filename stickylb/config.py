"""Theory of operation: the configuration, from a JSON file to frozen typed models.

The config flows one way: ``load_config(path)`` reads the file, environment variables
(``STICKYLB_`` prefix, ``__`` for nesting) override it, and pydantic validates the result into
the frozen ``Config`` below. The running pieces receive these models and never reach back into
the raw JSON or mutate them; runtime state (health, counters) lives in ``pool.py``.

Every key of smart-stick-loadbalancer 1.1.0 is accepted with its own (camelCase) spelling and
meaning; snake_case spellings are accepted too. Unknown keys are errors, with a "did you mean".
Durations given as numbers are milliseconds; strings take a unit (``"10s"``).

Invalid input raises ``ConfigError`` whose ``problems`` are one line per problem, each naming the
field path (``backends.1.url: ...``).
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from yarl import URL

from .core.health_rules import ALGORITHMS, ResponseRule, parse_status_ranges
from .core.strategies import STRATEGIES
from .durations import format_duration, format_ms, parse_duration, parse_size
from .mail_services import KNOWN_MAIL_SERVICES, Security

DEFAULT_STRATEGY = "round-robin"
DEFAULT_COOKIE_NAME = "X-Backend-ID"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_WEBSOCKET_IDLE_TIMEOUT = 3600.0
DEFAULT_KEEPALIVE_TIMEOUT = 15.0
DEFAULT_HEAD_TIMEOUT = 10.0
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_HEAD_SIZE = 64 * 1024
DEFAULT_MAX_HEADER_SIZE = 8190
DEFAULT_MAX_HEADERS = 128
DEFAULT_MAX_IDLE_PER_BACKEND = 128
# Below Node's 5 s server default, so a backend rarely closes a kept connection as we reuse it.
DEFAULT_BACKEND_KEEPALIVE = 4.0
DEFAULT_QUEUE_TIMEOUT = 5.0
DEFAULT_MAX_QUEUE = 1024
DEFAULT_WS_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_HEALTH_INTERVAL = 10.0
DEFAULT_HEALTH_TIMEOUT = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_MAX_FAILS = 3
DEFAULT_FAIL_WINDOW = 10.0
DEFAULT_AGENT_HEADER = "X-Stickylb-State"
DEFAULT_LEARN_TTL = 30 * 60.0
DEFAULT_LEASE_TIME = 10.0
DEFAULT_LEARN_MAX_ENTRIES = 100_000
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAIL_COOLDOWN = 60.0
DEFAULT_MAIL_TIMEOUT = 10.0
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")

Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, when_used="json")
]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
HealthCallable = Callable[..., Any]


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        arbitrary_types_allowed=True,
    )


def _load_callable(value: object) -> HealthCallable | None:
    """A custom check: a callable (Python API) or ``"package.module:function"`` (JSON)."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected a callable or an import path "package.module:function"')
    module_name, _, attr_path = value.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config problem
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise ValueError(f"{value!r} is not callable")
    return typing.cast(HealthCallable, target)


CheckCallable = Annotated[HealthCallable | None, BeforeValidator(_load_callable)]


def _status_ranges(value: object) -> tuple[tuple[int, int], ...] | None:
    return None if value is None else parse_status_ranges(value)


StatusRanges = Annotated[tuple[tuple[int, int], ...] | None, BeforeValidator(_status_ranges)]


def _check_algorithm(value: str) -> str:
    if value not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {value!r}; valid: {', '.join(ALGORITHMS)}")
    return value


def _check_method(value: str) -> str:
    if not value.isalpha():
        raise ValueError(f"invalid HTTP method {value!r}")
    return value.upper()


def _check_networks(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return values


class UnavailableConfig(_Model):
    """The answer when no backend can take a request (node-harmony's ``unavailable``)."""

    status: int = Field(default=503, ge=400, le=599)
    body: str | None = None
    content_type: str = "text/plain; charset=utf-8"
    handler: CheckCallable = None  # (request) -> web.StreamResponse | str, sync or async


def _unavailable(value: object) -> object:
    return {"body": value} if isinstance(value, str) else value


def _token_like(value: str, what: str) -> str:
    """A header or cookie name: an HTTP token (no separators, no spaces)."""
    if not value or any(c in value for c in ' ;,=\t\r\n"()<>@:\\/[]?{}'):
        raise ValueError(f"{value!r} is not a valid {what}")
    return value


class CookieConfig(_Model):
    """The affinity cookie set on the first response to a client."""

    name: str = DEFAULT_COOKIE_NAME
    path: str = "/"
    max_age: int | None = Field(default=None, ge=0)
    domain: str | None = None
    secure: bool = False
    http_only: bool = True
    same_site: Literal["Lax", "Strict", "None"] = "Lax"
    # One secret, or a list: the first signs, every one is accepted (rotation without moving
    # anyone: a token of an older secret is re-issued with the first).
    secret: SecretStr | list[SecretStr] | None = None

    # With either, the token carries signed times: when it was first issued, when last seen.
    idle_timeout: Duration | None = None
    absolute_timeout: Duration | None = None

    @model_validator(mode="after")
    def _times_need_a_secret(self) -> CookieConfig:
        if (self.idle_timeout or self.absolute_timeout) and not self.secrets:
            raise ValueError(
                "idleTimeout and absoluteTimeout need cookie.secret (the times are signed)"
            )
        return self

    @property
    def secrets(self) -> list[str]:
        if self.secret is None:
            return []
        listed = self.secret if isinstance(self.secret, list) else [self.secret]
        return [secret.get_secret_value() for secret in listed]

    @field_validator("secret")
    @classmethod
    def _some_secret(
        cls, value: SecretStr | list[SecretStr] | None
    ) -> SecretStr | list[SecretStr] | None:
        if isinstance(value, list) and not value:
            raise ValueError("list at least one secret (the first signs)")
        return value

    @field_validator("name")
    @classmethod
    def _token_name(cls, value: str) -> str:
        return _token_like(value, "cookie name")


class AffinitySource(_Model):
    """Where a client without a valid stickylb cookie belongs: exactly one of ``header``,
    ``query``, ``ip`` or ``learnCookie`` (``core/affinity_sources.py``)."""

    header: str | None = None
    query: str | None = None
    ip: bool | None = None
    learn_cookie: str | None = None
    ttl: Duration = DEFAULT_LEARN_TTL  # learnCookie: forgotten after this long unused
    max_entries: int = Field(default=DEFAULT_LEARN_MAX_ENTRIES, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _exactly_one(self) -> AffinitySource:
        given = [kind for kind in SOURCE_KINDS if getattr(self, _SOURCE_FIELDS[kind]) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SOURCE_KINDS)} (got {len(given)})")
        if self.ip is False:
            raise ValueError("ip: true is the only value (leave the source out instead)")
        if self.kind != "learnCookie" and {"ttl", "max_entries"} & self.model_fields_set:
            raise ValueError("ttl and maxEntries belong to a learnCookie source")
        if self.header is not None:
            _token_like(self.header, "header name")
        if self.learn_cookie is not None:
            _token_like(self.learn_cookie, "cookie name")
        if self.query is not None and (not self.query or any(c in self.query for c in "&=#")):
            raise ValueError(f"{self.query!r} is not a valid query parameter name")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if getattr(self, _SOURCE_FIELDS[k]) is not None)


SOURCE_KINDS = ("header", "query", "ip", "learnCookie")
_SOURCE_FIELDS = {"header": "header", "query": "query", "ip": "ip", "learnCookie": "learn_cookie"}


class AffinityConfig(_Model):
    """What places a client that carries no valid stickylb cookie, and what happens when the
    backend a client is held to cannot serve it."""

    sources: list[AffinitySource] = Field(default_factory=list)
    on_failure: Literal["rebalance", "fail"] = "rebalance"

    @field_validator("sources")
    @classmethod
    def _one_learned_cookie(cls, value: list[AffinitySource]) -> list[AffinitySource]:
        if sum(source.learn_cookie is not None for source in value) > 1:
            raise ValueError("at most one learnCookie source")
        return value


class TimeoutsConfig(_Model):
    """Upstream and client timeouts; none of them caps a whole request (all are idle gaps,
    except ``head``, which bounds the time to send one request head)."""

    connect: Duration = DEFAULT_CONNECT_TIMEOUT
    read: Duration = DEFAULT_READ_TIMEOUT
    websocket_idle: Duration = DEFAULT_WEBSOCKET_IDLE_TIMEOUT
    keep_alive: Duration = DEFAULT_KEEPALIVE_TIMEOUT
    head: Duration = DEFAULT_HEAD_TIMEOUT
    client_body: Duration = DEFAULT_CLIENT_BODY_TIMEOUT
    backend_keep_alive: Duration = DEFAULT_BACKEND_KEEPALIVE


class LimitsConfig(_Model):
    """Size limits on what clients send, and on the connections kept to backends."""

    max_body_size: ByteSize | None = None
    max_head_size: ByteSize = Field(default=DEFAULT_MAX_HEAD_SIZE, ge=1024)
    max_header_size: ByteSize = Field(default=DEFAULT_MAX_HEADER_SIZE, ge=256)
    max_headers: int = Field(default=DEFAULT_MAX_HEADERS, ge=1)
    max_idle_per_backend: int = Field(default=DEFAULT_MAX_IDLE_PER_BACKEND, ge=0)


class WebSocketConfig(_Model):
    max_message_size: ByteSize = DEFAULT_WS_MAX_MESSAGE_SIZE
    # Under maint, removal, reload or shutdown, a backend's WebSockets are closed with 1012
    # spread over this time; None leaves them open until they close (shutdown: 1001 at once).
    drain_timeout: Duration | None = None


class HealthConfig(_Model):
    """Global health-check settings; each backend may override the probe ones."""

    enabled: bool = True
    interval: Duration = DEFAULT_HEALTH_INTERVAL
    down_interval: Duration | None = None
    jitter: float = Field(default=0.1, ge=0, le=0.5)
    path: str = "/"
    method: str = "GET"
    algorithm: str = "http-status"
    timeout: Duration = DEFAULT_HEALTH_TIMEOUT
    headers: dict[str, str] = Field(default_factory=dict)
    check: CheckCallable = None
    expect_status: StatusRanges = None
    expect_body: str | None = None
    rise: int = Field(default=DEFAULT_RISE, ge=1)
    fall: int = Field(default=DEFAULT_FALL, ge=1)
    max_fails: int = Field(default=DEFAULT_MAX_FAILS, ge=0)
    fail_window: Duration = DEFAULT_FAIL_WINDOW
    slow_start: Duration = 0.0
    # A check answer carrying this header (drain, maint or ready) sets the backend's state.
    agent_header: str | None = DEFAULT_AGENT_HEADER

    _algorithm = field_validator("algorithm")(_check_algorithm)
    _method = field_validator("method")(_check_method)

    @field_validator("interval")
    @classmethod
    def _positive_interval(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value


class BackendConfig(_Model):
    """One upstream server. ``health*`` keys override the global ``health`` settings."""

    id: int | str
    url: str
    weight: float = Field(default=1.0, ge=0)
    owner: str | None = None
    max_connections: int | None = Field(default=None, ge=0)
    health_path: str | None = None
    health_method: str | None = None
    health_algorithm: str | None = None
    health_timeout: Duration | None = None
    health_headers: dict[str, str] | None = None
    health_check: CheckCallable = None
    health_expect_status: StatusRanges = None
    health_expect_body: str | None = None
    health_rise: int | None = Field(default=None, ge=1)
    health_fall: int | None = Field(default=None, ge=1)
    health_slow_start: Duration | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_type(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise ValueError("must be an integer or a non-empty string")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (ValueError, TypeError):
            raise ValueError(f"{value!r} is not a URL") from None
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{value!r} must start with http:// or https://")
        if not url.host:
            raise ValueError(f"{value!r} has no host")
        if url.query_string or url.fragment:
            raise ValueError(f"{value!r} must not have a query or fragment")
        return str(url).rstrip("/")

    @field_validator("health_algorithm")
    @classmethod
    def _algorithm(cls, value: str | None) -> str | None:
        return None if value is None else _check_algorithm(value)

    @field_validator("health_method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        return None if value is None else _check_method(value)


class EmailAuth(_Model):
    user: str | None = None
    password: SecretStr | None = Field(default=None, alias="pass")


class EmailConfig(_Model):
    """SMTP settings for alerts; ``service`` names a well-known provider (nodemailer style)."""

    service: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Security | None = None
    secure: bool | None = None  # nodemailer's spelling: true is security "tls"
    auth: EmailAuth = EmailAuth()
    from_: str | None = Field(default=None, alias="from")
    to: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=list
    )
    ca_file: str | None = None
    timeout: Duration = DEFAULT_MAIL_TIMEOUT
    cooldown: Duration = DEFAULT_MAIL_COOLDOWN
    retries: int = Field(default=3, ge=0, le=10)
    queue_size: int = Field(default=100, ge=1)

    @field_validator("service")
    @classmethod
    def _known_service(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in KNOWN_MAIL_SERVICES:
            raise ValueError(
                f"unknown service {value!r}; known: {', '.join(KNOWN_MAIL_SERVICES)}"
                " (or set email.host and email.port)"
            )
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _has_server(self) -> EmailConfig:
        if self.service is None and self.host is None:
            raise ValueError('set email.service (e.g. "gmail") or email.host')
        return self

    @property
    def smtp_host(self) -> str:
        return self.host or KNOWN_MAIL_SERVICES[self.service or ""].host

    @property
    def smtp_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.service:
            return KNOWN_MAIL_SERVICES[self.service].port
        return {"tls": 465, "starttls": 587}.get(self.smtp_security, 25)

    @property
    def smtp_security(self) -> Security:
        if self.security is not None:
            return self.security
        if self.secure:
            return "tls"
        if self.service:
            return KNOWN_MAIL_SERVICES[self.service].security
        if self.port == 465:  # implicit TLS's port, as nodemailer infers
            return "tls"
        return "none"

    @property
    def sender(self) -> str:
        return self.from_ or self.auth.user or "stickylb@localhost"


ALERT_EVENTS = ("down", "up", "drain", "maint", "ready", "added", "removed")


class WebhookConfig(_Model):
    """A URL that gets a POST for every backend state change it asks for."""

    url: SecretStr  # Slack's and most incident tools' URLs carry their secret in the path
    format: Literal["json", "slack"] = "json"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    events: list[str] | None = None  # None: every event
    timeout: Duration = DEFAULT_MAIL_TIMEOUT
    cooldown: Duration = DEFAULT_MAIL_COOLDOWN
    retries: int = Field(default=3, ge=0, le=10)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        try:
            url = URL(value.get_secret_value())
        except (ValueError, TypeError):
            raise ValueError("is not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        for event in value or ():
            if event not in ALERT_EVENTS:
                raise ValueError(f"unknown event {event!r}; valid: {', '.join(ALERT_EVENTS)}")
        return value


class TlsConfig(_Model):
    """HTTPS on ``port`` (``tls.py``)."""

    cert: str
    key: str
    min_version: Literal["1.2", "1.3"] = "1.2"
    key_password: SecretStr | None = None  # better: STICKYLB_TLS__KEY_PASSWORD
    redirect_http_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("cert", "key")
    @classmethod
    def _a_file(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _loads(self) -> TlsConfig:
        from .tls import server_context  # the certificate must load, or nothing starts

        server_context(self)
        return self


class AccessLogConfig(_Model):
    """One line per request (``--access-log`` turns it on with these settings)."""

    enabled: bool = False
    format: Literal["combined", "json"] = "combined"
    path: str = "-"  # "-": standard output


class ClusterConfig(_Model):
    """Several stickylb sharing runtime state through Redis (``cluster.py``)."""

    redis: SecretStr  # may carry a password: never printed (STICKYLB_CLUSTER__REDIS)
    name: str = "stickylb"  # namespaces the keys, so several clusters can share one Redis
    lease_time: Duration = DEFAULT_LEASE_TIME  # the alerting instance's lease

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("name")
    @classmethod
    def _key_safe(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or len(value) > 100:
            raise ValueError("a non-empty name without spaces, at most 100 characters")
        return value

    @field_validator("lease_time")
    @classmethod
    def _long_enough(cls, value: float) -> float:
        if value < 1:
            raise ValueError("at least 1s (the lease is renewed every leaseTime / 5)")
        return value

    def where(self) -> str:
        """The Redis address without credentials, for log lines."""
        url = URL(self.redis.get_secret_value())
        if url.scheme == "unix":
            return f"unix://{url.path}"
        return f"{url.scheme}://{url.host}:{url.port or 6379}{url.path}"


class AdminConfig(_Model):
    """The balancer's own endpoints (``/_lb/health``)."""

    prefix: str = "/_lb"
    allow: list[str] = Field(default_factory=lambda: list(LOOPBACK_NETWORKS))
    token: SecretStr | None = None

    _networks = field_validator("allow")(_check_networks)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or value.endswith("/"):
            raise ValueError("must start with '/', not end with '/', and not be '/' alone")
        return value


class Config(BaseSettings):
    """The whole configuration of one balancer.

    >>> cfg = Config(port=3001, backends=[{"id": 0, "url": "http://127.0.0.1:5000"}])
    >>> cfg.strategy
    'round-robin'
    """

    model_config = SettingsConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        arbitrary_types_allowed=True,
        env_prefix="STICKYLB_",
        env_nested_delimiter="__",
        case_sensitive=False,
        # Defaults are already in their parsed form (seconds, bytes); re-parsing would misread them.
        validate_default=False,
    )

    port: int = Field(ge=0, le=65535)
    host: str = "0.0.0.0"
    strategy: str = DEFAULT_STRATEGY
    sticky: bool = True
    cookie: CookieConfig = CookieConfig()
    affinity: AffinityConfig = AffinityConfig()
    backend_header: bool = True
    preserve_host: bool = False
    trusted_proxies: list[str] = Field(default_factory=list)
    retries: int = Field(default=1, ge=0, le=10)
    max_connections: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=0)
    queue_timeout: Duration = DEFAULT_QUEUE_TIMEOUT
    unavailable: Annotated[UnavailableConfig | None, BeforeValidator(_unavailable)] = None
    shutdown_timeout: Duration = DEFAULT_SHUTDOWN_TIMEOUT
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    health: HealthConfig = HealthConfig()
    email: EmailConfig | None = None
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    access_log: AccessLogConfig = AccessLogConfig()
    tls: TlsConfig | None = None
    request_id_header: str | None = "X-Request-Id"
    admin: AdminConfig = AdminConfig()
    state_file: str | None = None
    cluster: ClusterConfig | None = None
    backends: list[BackendConfig] = Field(min_length=1)

    _networks = field_validator("trusted_proxies")(_check_networks)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (passed in as init values); nothing else is read.
        return (env_settings, init_settings)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; valid: {', '.join(STRATEGIES)}")
        return value

    @model_validator(mode="after")
    def _backends_consistent(self) -> Config:
        seen: dict[str, int] = {}
        for index, backend in enumerate(self.backends):
            key = str(backend.id)
            if key in seen:
                raise ValueError(
                    f"backends.{index}.id: duplicate id {backend.id!r} (also backends.{seen[key]})"
                )
            seen[key] = index
        for source in self.affinity.sources:
            if source.learn_cookie == self.cookie.name:
                raise ValueError(
                    f"affinity.sources: learnCookie {source.learn_cookie!r} is stickylb's own "
                    "cookie (cookie.name); name the application's session cookie"
                )
        if sum(backend.weight for backend in self.backends) <= 0:
            raise ValueError("backends: the weights add up to 0; at least one must be positive")
        return self

    def health_for(self, backend: BackendConfig) -> HealthSettings:
        """The probe settings of ``backend``: its own keys, else ``health.*``, else defaults."""
        g = self.health

        def pick(own: Any, default: Any) -> Any:
            return default if own is None else own

        return HealthSettings(
            path=pick(backend.health_path, g.path),
            method=pick(backend.health_method, g.method),
            algorithm=pick(backend.health_algorithm, g.algorithm),
            timeout=pick(backend.health_timeout, g.timeout),
            headers=types.MappingProxyType(dict(pick(backend.health_headers, g.headers))),
            check=pick(backend.health_check, g.check),
            rule=ResponseRule(
                algorithm=pick(backend.health_algorithm, g.algorithm),
                expect_status=pick(backend.health_expect_status, g.expect_status),
                expect_body=pick(backend.health_expect_body, g.expect_body),
            ),
            rise=pick(backend.health_rise, g.rise),
            fall=pick(backend.health_fall, g.fall),
            slow_start=pick(backend.health_slow_start, g.slow_start),
        )


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """One backend's resolved probe settings (see ``Config.health_for``)."""

    path: str
    method: str
    algorithm: str
    timeout: float
    headers: Mapping[str, str]
    check: HealthCallable | None
    rule: ResponseRule
    rise: int
    fall: int
    slow_start: float = 0.0

    def public(self) -> dict[str, Any]:
        """The ``healthCheck`` object of ``/_lb/health``: never a header value."""
        return {
            "path": self.path,
            "method": self.method,
            "algorithm": self.algorithm,
            "timeout": format_ms(self.timeout),
            "hasCustomHeaders": bool(self.headers),
            "hasCustomFunction": self.check is not None,
        }


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a JSON config file, apply ``STICKYLB_*`` environment overrides and validate it.

    Raises ``ConfigError`` with one line per problem.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{file}: is a directory, not a config file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read: {exc.__class__.__name__}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: the top level must be a JSON object"])
    # "module:function" checks are imported relative to the config's folder and the cwd.
    for folder in (str(file.resolve().parent), os.getcwd()):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return build_config(data)


def build_config(data: Mapping[str, Any] | None = None, **overrides: Any) -> Config:
    """Validate a mapping (and keyword overrides) into a ``Config``, with ``STICKYLB_*``
    environment variables over it; raise ``ConfigError``."""
    values = {**(data or {}), **overrides}
    variables = environment_settings(os.environ)
    unknown = [
        f"{name} (environment): unknown setting" + _env_did_you_mean(name)
        for name, path in variables.items()
        if path is None
    ]
    if unknown:
        raise ConfigError(unknown)
    try:
        return Config(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, variables)) from None
    except ValueError as exc:  # env values that are not valid JSON for complex fields
        raise ConfigError([f"environment: {exc}"]) from None


ENV_PREFIX = "STICKYLB_"
# Read by other tools than the balancer (``stickylb ctl``): not settings.
NOT_SETTINGS = frozenset({"STICKYLB_CONFIG"})


def environment_settings(environ: Mapping[str, str]) -> dict[str, tuple[str, ...] | None]:
    """Each ``STICKYLB_*`` variable and the setting it reaches (field names), or None when it
    reaches none: pydantic-settings would ignore it silently, a typo in a file is an error."""
    found: dict[str, tuple[str, ...] | None] = {}
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        found[name] = _env_path(Config, parts, top=True)
    return found


def _env_path(model: Any, parts: list[str], *, top: bool) -> tuple[str, ...] | None:
    """The field path ``parts`` names, as pydantic-settings reads it: at the top level only a
    field's own (snake_case) name; inside an object its name or its alias."""
    for name, field in model.model_fields.items():
        spellings = {name.lower()} if top else {name.lower(), (field.alias or name).lower()}
        if parts[0] not in spellings:
            continue
        if len(parts) == 1:
            return (name,)
        sub = _model_of(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            rest = _env_path(sub, parts[1:], top=False)
            return None if rest is None else (name, *rest)
        if "dict" in str(field.annotation):  # keys of a mapping (health.headers.X)
            return (name, *parts[1:])
        return None
    return None


def _env_did_you_mean(name: str) -> str:
    known = [ENV_PREFIX + "__".join(path).upper() for path in _all_env_paths(Config, ())]
    match = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.7)
    return f" (did you mean {match[0]}?)" if match else ""


def _all_env_paths(model: Any, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        paths.append((*prefix, name))
        sub = _model_of(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            paths += _all_env_paths(sub, (*prefix, name))
    return paths


def format_validation_error(
    exc: ValidationError, variables: Mapping[str, tuple[str, ...] | None] | None = None
) -> list[str]:
    from_env = {
        tuple(part.replace("_", "") for part in path): name
        for name, path in (variables or {}).items()
        if path is not None
    }
    lines: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [part for part in error["loc"] if not _is_branch_tag(part)]
        where = ".".join(str(part) for part in loc) or "config"
        key = tuple(str(part).lower().replace("_", "") for part in loc)
        for length in range(len(key), 0, -1):
            if key[:length] in from_env:
                where += f" (from {from_env[key[:length]]})"
                break
        kind = error["type"]
        message = str(error["msg"])
        if kind == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif kind == "missing":
            message = "required"
        elif kind == "too_short" and loc == ["backends"]:
            message = "must list at least one backend"
        elif kind in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if message.startswith("backends"):
                where, _, message = message.partition(": ")
        line = f"{where}: {message}"
        if line not in lines:
            lines.append(line)
    return lines


def _is_branch_tag(part: object) -> bool:
    # pydantic adds the name of the union member or validator to locations; users never wrote it.
    return isinstance(part, str) and (
        part.startswith("function-") or part in {"int", "str", "float", "callable", "none"}
    )


def _did_you_mean(loc: Sequence[int | str]) -> str:
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = _find_field(model, part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    known = {name for name in model.model_fields} | {
        f.alias for f in model.model_fields.values() if f.alias
    }
    match = difflib.get_close_matches(str(loc[-1]), sorted(known), n=1, cutoff=0.6)
    if not match:
        return ""
    field = _find_field(model, match[0])
    return f" (did you mean {(field.alias if field and field.alias else match[0])!r}?)"


def _find_field(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def describe(config: Config) -> dict[str, Any]:
    """The resolved settings as JSON-ready data, secrets masked (for ``--check``)."""
    data = config.model_dump(
        mode="json", by_alias=True, exclude={"backends", "health", "unavailable"}
    )
    if config.email is not None:  # what will be used, not what was left out
        data["email"].update(
            host=config.email.smtp_host,
            port=config.email.smtp_port,
            security=config.email.smtp_security,
            **{"from": config.email.sender},
        )
    if config.unavailable is not None:
        data["unavailable"] = config.unavailable.model_dump(
            mode="json", by_alias=True, exclude={"handler"}
        )
        data["unavailable"]["handler"] = _callable_name(config.unavailable.handler)
    # Each source as written: its one kind (and a learnCookie's ttl and maxEntries), no nulls.
    data["affinity"]["sources"] = [
        source.model_dump(
            mode="json",
            by_alias=True,
            exclude_none=True,
            exclude=None if source.learn_cookie is not None else {"ttl", "max_entries"},
        )
        for source in config.affinity.sources
    ]
    data["health"] = config.health.model_dump(mode="json", by_alias=True, exclude={"check"})
    data["health"]["check"] = _callable_name(config.health.check)
    data["backends"] = []
    for backend in config.backends:
        item = backend.model_dump(mode="json", by_alias=True, exclude={"health_check"})
        item["healthCheck"] = _callable_name(backend.health_check)
        item["resolvedHealthCheck"] = config.health_for(backend).public()
        if item.get("healthHeaders"):
            item["healthHeaders"] = dict.fromkeys(item["healthHeaders"], "**********")
        data["backends"].append(item)
    if data["health"].get("headers"):
        data["health"]["headers"] = dict.fromkeys(data["health"]["headers"], "**********")
    return data


def _callable_name(check: HealthCallable | None) -> str | None:
    if check is None:
        return None
    module = getattr(check, "__module__", None) or "?"
    return f"{module}:{getattr(check, '__qualname__', type(check).__name__)}"
