"""What every process does first: settings from env (validated), secrets from the data volume, logging."""

from __future__ import annotations

import logging
import sys

from appliance.secrets import ensure_secrets
from appliance.settings import ConfigError, Settings, load_settings


def load() -> Settings:
    """Settings with secrets filled in; exits with one readable line when a value is wrong."""
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error.line, file=sys.stderr, flush=True)
        raise SystemExit(error.code) from None
    ensure_secrets(settings)
    return settings


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "httpcore", "PIL", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
