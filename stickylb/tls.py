"""HTTPS in front: the server-side TLS context from ``tls`` in the config, and the plain-HTTP
port that only redirects to it.

The context is built when the config is validated (so a certificate that does not load is a
config error, named, before anything listens, and a reload with a broken one changes nothing)
and again on every reload: new handshakes use the new certificate, connections already open
keep theirs. TLS 1.2 is the floor unless ``minVersion`` says 1.3; the ciphers are OpenSSL's
defaults for a server (``ssl.create_default_context``). The key's password comes from the
config or, better, ``STICKYLB_TLS__KEY_PASSWORD``; it is never printed.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .config import TlsConfig

HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to finish its TLS handshake


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context for ``tls``; ``ValueError`` (one line, no secret) when it cannot be made."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_alpn_protocols(["http/1.1"])
    password = tls.key_password.get_secret_value() if tls.key_password else None
    try:
        context.load_cert_chain(tls.cert, tls.key, password=password)
    except FileNotFoundError as exc:
        raise ValueError(f"no such file: {exc.filename}") from None
    except ssl.SSLError as exc:
        reason = exc.reason or "invalid"
        raise ValueError(f"cannot load the certificate and key ({reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read the certificate or key: {exc.strerror}") from None
    return context


def redirect_app(https_port: int) -> web.Application:
    """Every request on the plain port gets 308 to the same host and path over HTTPS."""

    async def redirect(request: web.Request) -> web.Response:
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        port = "" if https_port == 443 else f":{https_port}"
        return web.Response(
            status=308,
            headers={"Location": f"https://{host}{port}{request.raw_path}", "Connection": "close"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app
