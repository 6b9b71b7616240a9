"""The one place for what the bootstrap writes about Label Studio (``<data>/state.json``): the project id, the
storage and ML connection ids, when the bootstrap last finished. Read by every process, written atomically."""

from __future__ import annotations

import json
import os
from typing import Any

from appliance.settings import Settings


def read(settings: Settings) -> dict[str, Any]:
    try:
        return json.loads((settings.data / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def write(settings: Settings, state: dict[str, Any]) -> None:
    path = settings.data / "state.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def project_id(settings: Settings) -> int | None:
    """The appliance's project in Label Studio, or None before the first bootstrap."""
    found = read(settings).get("project_id")
    return int(found) if found else None
