"""Bootstrap step for Google Cloud Storage: a GCS import storage over the source bucket (synced unless tasks come
from a manifest) and a GCS export storage that receives every submitted annotation, converged idempotently.

A storage is found by its bucket, so a restart updates it instead of adding another. Label Studio never returns
the key, so the key's hash is kept in ``state.json`` to notice a new key.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from label_studio_sdk.client import LabelStudio

from appliance.labelstudio import client as studio_api
from appliance.settings import Settings

log = logging.getLogger("bootstrap.gcs")


def converge(ls: LabelStudio, settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """Preflight, then both storages; returns the state entries to keep. Raises gcs.GcsError (one line)."""
    if not settings.gcs_enabled:
        return {}
    from appliance import gcs  # google-cloud-storage loads only where GCS is used

    gcs.preflight(settings)
    key = settings.gcs_key_json or ""
    key_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
    new_key = state.get("gcs_key_sha256") != key_hash
    info = gcs.credentials_info(settings) or {}
    access = {"google_application_credentials": key,
              "google_project_id": settings.gcp_project or info.get("project_id", "")}
    out: dict[str, Any] = {"gcs_key_sha256": key_hash}
    if settings.gcs_source_bucket:
        out["gcs_import_storage_id"] = converge_source(ls, settings, state, access, new_key)
    if settings.gcs_target_bucket:
        out["gcs_export_storage_id"] = converge_target(ls, settings, state, access, new_key)
    if settings.shared_state:
        out["journal_storage_id"] = converge_shared_journal(ls, settings, state, access, new_key)
    return out


def presign(settings: Settings) -> bool:
    # An anonymous client (an emulator with no key) cannot sign: Label Studio proxies the images instead.
    return settings.gcs_presign and not (settings.storage_emulator_host and not settings.gcs_key_json)


def _upsert(api, existing, wanted: dict, access: dict, new_key: bool, project_id: int, what: str) -> int:
    if existing is None:
        created = api.create(project=project_id, **wanted, **access)
        log.info("created %s %d on gs://%s/%s", what, created.id, wanted["bucket"], wanted.get("prefix", ""))
        return created.id
    changes = sorted(k for k, v in wanted.items() if (getattr(existing, k, None) or None) != (v or None))
    if changes or new_key:
        api.update(existing.id, **wanted, **access)
        log.info("updated %s %d: %s", what, existing.id, ", ".join(changes + ["key"] * new_key))
    else:
        log.info("%s %d on gs://%s is up to date", what, existing.id, wanted["bucket"])
    return existing.id


def converge_source(ls: LabelStudio, settings: Settings, state: dict, access: dict, new_key: bool) -> int:

    project_id = state["project_id"]
    wanted = {"bucket": settings.gcs_source_bucket, "prefix": settings.gcs_source_prefix,
              "regex_filter": settings.gcs_source_filter, "use_blob_urls": True, "recursive_scan": True,
              "presign": presign(settings), "presign_ttl": settings.gcs_presign_ttl_minutes, "title": "GCS images"}
    existing = next((s for s in ls.import_storage.gcs.list(project=project_id)
                     if s.bucket == settings.gcs_source_bucket), None)
    storage_id = _upsert(ls.import_storage.gcs, existing, wanted, access, new_key, project_id, "GCS import storage")
    if state.get("manifest"):
        log.info("tasks come from a manifest (%s): the GCS import storage is not synced", state["manifest"]["source"])
        return storage_id
    before = ls.projects.get(project_id).task_number or 0
    ls.import_storage.gcs.sync(storage_id)
    after = studio_api.wait_sync(ls, project_id, before)
    log.info("GCS source synced: %d new task(s), %d in all", after - before, after)
    return storage_id


def converge_target(ls: LabelStudio, settings: Settings, state: dict, access: dict, new_key: bool) -> int:
    project_id = state["project_id"]
    wanted = {"bucket": settings.gcs_target_bucket, "prefix": settings.gcs_target_prefix,
              "can_delete_objects": True, "title": "GCS annotations"}
    existing = next((s for s in ls.export_storage.gcs.list(project=project_id)
                     if s.bucket == settings.gcs_target_bucket), None)
    storage_id = _upsert(ls.export_storage.gcs, existing, wanted, access, new_key, project_id, "GCS export storage")
    if existing is None:
        ls.export_storage.gcs.sync(storage_id)  # annotations made before the target existed
    return storage_id


def converge_shared_journal(ls: LabelStudio, settings: Settings, state: dict, access: dict, new_key: bool) -> int:
    """With the roles on several machines, every Label Studio replica writes the annotation journal to the shared
    bucket (appliance.shared.journal), where any trainer reads it."""
    from appliance.shared.journal import journal_prefix

    project_id = state["project_id"]
    wanted = {"bucket": settings.shared_bucket, "prefix": journal_prefix(settings), "can_delete_objects": True,
              "title": "Annotation journal (shared)"}
    existing = next((s for s in ls.export_storage.gcs.list(project=project_id)
                     if s.bucket == wanted["bucket"] and (s.prefix or "") == wanted["prefix"]), None)
    storage_id = _upsert(ls.export_storage.gcs, existing, wanted, access, new_key, project_id, "shared journal")
    if existing is None:
        ls.export_storage.gcs.sync(storage_id)  # annotations made before the journal was shared
    return storage_id
