"""What every process does first: settings from env (validated), secrets from the data volume, logging."""

from __future__ import annotations

import logging
import os
import sys

from appliance.secrets import ensure_secrets
from appliance.settings import ConfigError, Settings, load_settings
from appliance.volume import UMASK


def load() -> Settings:
    """Settings with secrets filled in; exits with one readable line when a value is wrong."""
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error.line, file=sys.stderr, flush=True)
        raise SystemExit(error.code) from None
    os.umask(UMASK)  # whatever a command writes on the data volume stays private to the appliance's user
    try:
        ensure_secrets(settings)
    except OSError as error:  # a data dir that is a file, read-only, or not ours: one line, not a traceback
        problem = ("is a file, not a folder" if settings.data.is_file()
                   else f"cannot read or write the secrets ({error.strerror})")
        print(f"configuration error: APPLIANCE_DATA_DIR ({settings.data}) {problem}. Point it at a writable "
              f"folder.", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return settings


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "httpcore", "PIL", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
