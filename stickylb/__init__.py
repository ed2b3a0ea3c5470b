"""stickylb: a sticky-session HTTP and WebSocket load balancer on aiohttp.

Embedding::

    from stickylb import build_config, build_app
    app = build_app(build_config({"port": 3001, "backends": [...]}))
"""

from .app import BALANCER_KEY, Balancer, build_app, handler_args, install
from .config import Config, ConfigError, build_config, load_config
from .health import BackendView
from .server import StartupError, serve

__version__ = "0.1.0"

__all__ = [
    "BALANCER_KEY",
    "BackendView",
    "Balancer",
    "Config",
    "ConfigError",
    "StartupError",
    "__version__",
    "build_app",
    "build_config",
    "handler_args",
    "install",
    "load_config",
    "serve",
]
