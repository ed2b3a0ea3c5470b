"""stickylb: a sticky-session HTTP and WebSocket load balancer on aiohttp.

Running it from Python::

    from stickylb import build_config, serve
    asyncio.run(serve(build_config({"port": 3001, "backends": [...]})))

Embedding in an aiohttp application::

    from stickylb import build_app, install
    app = build_app(build_config({"port": 3001, "backends": [...]}))

A backend registering itself (and leaving gracefully at the end of the block)::

    async with stickylb.registered("http://127.0.0.1:3001", id="web-7",
                                   url="http://127.0.0.1:5007", ttl="30s", token=TOKEN):
        await serve_forever()
"""

from .app import BALANCER_KEY, Balancer, build_app, handler_args, install
from .config import Config, ConfigError, build_config, load_config
from .health import BackendView
from .registration import Registration, RegistrationError, registered
from .server import Server, StartupError, serve

__version__ = "0.1.0"

__all__ = [
    "BALANCER_KEY",
    "BackendView",
    "Balancer",
    "Config",
    "ConfigError",
    "Registration",
    "RegistrationError",
    "Server",
    "StartupError",
    "__version__",
    "build_app",
    "build_config",
    "handler_args",
    "install",
    "load_config",
    "registered",
    "serve",
]
