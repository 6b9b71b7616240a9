"""`appliance import --manifest FILE_OR_GS_URI`: tasks from a CSV or JSON manifest, through Label Studio's API.

CSV: a column ``image`` (or ``image_uri``) and any metadata columns. JSON: a list of objects with an ``image``
(or ``image_uri``) key. Each row becomes a task ``{"image": uri, <metadata>...}``; images already in the project
(compared by URI, whatever created them) are skipped, so a re-run creates nothing. The template shows the fields
named in APPLIANCE_METADATA_FIELDS as Header lines.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from appliance.labelstudio import state as app_state
from appliance.labelstudio import client as studio_api
from appliance.settings import Settings

IMAGE_KEYS = ("image", "image_uri")
PAGE = 1000


class ManifestError(ValueError):
    """The manifest cannot be read or imported; one line says why."""


@dataclass
class Summary:
    rows: int = 0
    created: int = 0
    skipped: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def read(settings: Settings, source: str) -> bytes:
    if source.startswith("gs://"):
        from appliance import gcs

        try:
            return gcs.read_object(settings, source)
        except gcs.GcsError as error:
            raise ManifestError(str(error)) from None
    try:
        return Path(source).read_bytes()
    except OSError as error:
        raise ManifestError(f"cannot read manifest {source}: {error.strerror}") from None


def parse(data: bytes, name: str) -> list[dict]:
    """Rows of task data ``{"image": ..., **metadata}``, in manifest order."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{name} is not UTF-8 text") from None
    is_json = name.lower().endswith(".json") or text.lstrip().startswith("[")
    return _json_rows(text, name) if is_json else _csv_rows(text, name)


def _task(row: dict, where: str) -> dict:
    key = next((k for k in IMAGE_KEYS if k in row), None)
    image = row.get(key) if key else None
    if not isinstance(image, str) or not image.strip():
        raise ManifestError(f"{where}: no image URI (a non-empty 'image' or 'image_uri' value)")
    metadata = {k: v for k, v in row.items() if k and k not in IMAGE_KEYS}
    return {"image": image.strip(), **metadata}


def _csv_rows(text: str, name: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not set(IMAGE_KEYS) & {f.strip() for f in reader.fieldnames}:
        raise ManifestError(f"{name}: the CSV header needs an 'image' or 'image_uri' column")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    return [_task({k: (v or "").strip() for k, v in row.items() if k is not None}, f"{name} line {reader.line_num}")
            for row in reader]


def _json_rows(text: str, name: str) -> list[dict]:
    try:
        rows = json.loads(text)
    except ValueError as error:
        raise ManifestError(f"{name} is not valid JSON ({error})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ManifestError(f"{name}: a JSON manifest is a list of objects, each with an 'image' key")
    return [_task(row, f"{name} item {i}") for i, row in enumerate(rows)]


class Studio(studio_api.Studio):
    """The two Label Studio calls an import needs."""

    def images(self, project_id: int) -> set[str]:
        """Image URIs of the project's tasks, as stored (not resolved to presigned URLs)."""
        seen: set[str] = set()
        for page in range(1, 1_000_000):
            response = self.session.get(f"{self.base}/api/tasks", timeout=120, params={
                "project": project_id, "page": page, "page_size": PAGE, "fields": "task_only", "resolve_uri": "false"})
            if response.status_code == 404:  # past the last page
                break
            tasks = self._check(response, "listing the project's tasks").json().get("tasks", [])
            seen.update(str(t["data"].get("image")) for t in tasks if t.get("data", {}).get("image"))
            if len(tasks) < PAGE:
                break
        return seen

    def create(self, project_id: int, rows: list[dict]) -> int:
        answer = self.post(f"/api/projects/{project_id}/import", "importing tasks", timeout=600,
                           json=[{"data": row} for row in rows])
        return int(answer.get("task_count", len(rows)))


def import_manifest(settings: Settings, source: str, batch: int = 500) -> Summary:
    started = time.monotonic()
    project_id = app_state.project_id(settings)
    if not project_id:
        raise ManifestError("no project yet: start the appliance (its bootstrap creates the project) and retry")
    rows = parse(read(settings, source), source)
    summary = Summary(rows=len(rows), warnings=warnings(settings, rows))
    studio = Studio(settings)
    try:
        present = studio.images(project_id)
        todo = []
        for row in rows:
            if row["image"] in present:
                summary.skipped += 1
            else:
                present.add(row["image"])
                todo.append(row)
        for start in range(0, len(todo), max(1, batch)):
            summary.created += studio.create(project_id, todo[start:start + batch])
    except requests.RequestException as error:
        raise ManifestError(f"cannot reach Label Studio at {settings.studio_base_url} ({type(error).__name__})") \
            from None
    except studio_api.StudioError as error:
        raise ManifestError(str(error)) from None
    # From now on the bootstrap does not sync the GCS import storage: it would add each image again, bare.
    state = app_state.read(settings)
    state["manifest"] = {"source": source, "imported_at": time.time()}
    app_state.write(settings, state)
    summary.seconds = time.monotonic() - started
    return summary


def warnings(settings: Settings, rows: list[dict]) -> list[str]:
    found: list[str] = []
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    missing = [f for f in settings.metadata_fields if f not in columns]
    if missing:
        found.append(f"APPLIANCE_METADATA_FIELDS names {', '.join(missing)}, absent from the manifest")
    buckets = {urlsplit(r["image"]).netloc for r in rows if r["image"].startswith("gs://")}
    others = sorted(buckets - {settings.gcs_source_bucket})
    if others:
        found.append(f"images in bucket(s) {', '.join(others)}: Label Studio signs URLs of "
                     f"APPLIANCE_GCS_SOURCE_BUCKET ({settings.gcs_source_bucket or 'unset'}) only")
    return found
