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
    """The appliance's project in Label Studio, or None before the first bootstrap.

    A node without the studio role (the roles split over machines) has no bootstrap of its own: it finds the project
    by its title through Label Studio's API, and remembers it here."""
    found = read(settings).get("project_id")
    if not found and "studio" not in settings.roles:
        found = _by_title(settings)
        if found:
            write(settings, {**read(settings), "project_id": found})
    return int(found) if found else None


def _by_title(settings: Settings) -> int | None:
    import requests

    from appliance.labelstudio.client import Studio

    try:
        projects = Studio(settings, timeout=10).get("/api/projects", "finding the project",
                                                    params={"title": settings.project_title})
    except (requests.RequestException, RuntimeError):
        return None  # Label Studio not up yet: asked again later
    results = projects.get("results", projects) if isinstance(projects, dict) else projects
    return next((p["id"] for p in results if p.get("title") == settings.project_title), None)
