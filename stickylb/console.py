"""What every command of the command line shares: exit statuses and log set-up."""

from __future__ import annotations

import logging
import sys

EXIT_CONFIG = 2  # an invalid config: one line per problem on stderr, no traceback
EXIT_STARTUP = 1  # cannot start (port in use, ...)
LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str, workers: int = 1) -> None:
    process = " [%(process)d]" if workers > 1 else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s{process} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
