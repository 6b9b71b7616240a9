"""One-shot bootstrap: converge Label Studio to what the settings describe, through its API (the annotation
journal alone goes through Label Studio's models: see studio_scripts/storages.py for why).

Runs after every start (supervisord's ``bootstrap`` program). Each step compares before it writes, so N restarts
create nothing twice: the project (found by the id remembered in ``<data>/state.json``, else by title), its
template and settings, both ML connections, the annotation journal, and a Local Files storage over the images folder
(synced, which imports only new files).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.client import LabelStudio

from appliance import gcs_bootstrap, studio, template
from appliance.labelstudio import client as studio_api
from appliance.labelstudio import state as app_state
from appliance.settings import Settings
from appliance.shared.lock import bootstrap_turn

log = logging.getLogger("bootstrap")

IMAGE_REGEX = r"(?i).*\.(jpe?g|png|bmp|gif|tiff?|webp)$"  # camera files are IMG_0001.JPG


@dataclass
class Backend:
    title: str
    url: str
    interactive: bool


def backends(settings: Settings) -> dict[str, Backend]:
    # Order matters: Label Studio retrieves predictions on task load from the project's FIRST ML backend.
    return {
        "predict": Backend("Pre-annotation (MMDetection)", settings.predict_base_url, False),
        "sam": Backend("SAM (interactive)", settings.sam_base_url, True),
    }


def find_project(ls: LabelStudio, settings: Settings, state: dict[str, Any]):
    if state.get("project_id"):
        for project in ls.projects.list(ids=str(state["project_id"])):
            if project.id == state["project_id"]:
                return project
    for project in ls.projects.list(title=settings.project_title):
        if project.title == settings.project_title:
            return project
    return None


def converge_project(ls: LabelStudio, settings: Settings, state: dict[str, Any]) -> int:
    wanted = {
        "title": settings.project_title,
        "description": settings.project_description,
        "label_config": template.label_config(settings),
        "evaluate_predictions_automatically": True,  # "retrieve predictions when loading a task"
        "show_collab_predictions": True,
        "model_version": None,
    }
    project = find_project(ls, settings, state)
    if project is None:
        wanted.pop("model_version")
        project = ls.projects.create(**wanted)
        log.info("created project %d %r", project.id, project.title)
        return project.id
    current = ls.projects.get(project.id)
    changes = {k: v for k, v in wanted.items() if k != "model_version" and getattr(current, k, None) != v}
    if changes:
        ls.projects.update(project.id, **changes)
        log.info("updated project %d: %s", project.id, ", ".join(sorted(changes)))
    else:
        log.info("project %d %r is up to date", project.id, current.title)
    return project.id


def converge_local_storage(ls: LabelStudio, settings: Settings, project_id: int) -> int:
    path = str(settings.served_images)  # under Label Studio's document root, a link to the images folder
    storage = next((s for s in ls.import_storage.local.list(project=project_id) if s.path == path), None)
    if storage is None:
        storage = ls.import_storage.local.create(project=project_id, path=path, regex_filter=IMAGE_REGEX,
                                                 use_blob_urls=True, recursive_scan=True, title="Images folder")
        log.info("created Local Files storage %d over %s", storage.id, path)
    elif storage.regex_filter != IMAGE_REGEX:  # a volume from before upper-case extensions were imported
        ls.import_storage.local.update(storage.id, project=project_id, regex_filter=IMAGE_REGEX)
        log.info("Local Files storage %d now imports %s", storage.id, IMAGE_REGEX)
    before = ls.projects.get(project_id).task_number or 0
    ls.import_storage.local.sync(storage.id)
    after = studio_api.wait_sync(ls, project_id, before)
    log.info("images folder synced: %d new task(s), %d in all", after - before, after)
    return storage.id


def converge_backend(ls: LabelStudio, settings: Settings, project_id: int, backend: Backend) -> int:
    deadline = time.monotonic() + settings.ready_timeout
    studio_api.wait_http(f"{backend.url}/health", deadline, backend.title, auth=settings.backend_credentials)
    user, password = settings.backend_credentials
    wanted = {"title": backend.title, "is_interactive": backend.interactive, "auth_method": "BASIC_AUTH",
              "basic_auth_user": user, "basic_auth_pass": password, "auto_update": True}
    # Matched by title first: a backend that moved to another port is updated, not duplicated beside a dead one.
    connected = list(ls.ml.list(project=project_id))
    existing = next((m for m in connected if m.title == backend.title), None) or next(
        (m for m in connected if m.url.rstrip("/") == backend.url), None)
    if existing is None:
        created = ls.ml.create(project=project_id, url=backend.url, **wanted)
        log.info("connected %s at %s (ML backend %d)", backend.title, backend.url, created.id)
        return created.id
    # The password is write-only in the API: compare what can be read, and re-send it only on a change.
    readable = {k: v for k, v in wanted.items() if k != "basic_auth_pass"}
    moved = existing.url.rstrip("/") != backend.url
    if moved or any(getattr(existing, k, None) != v for k, v in readable.items()) or existing.state != "CO":
        # Label Studio 1.23 re-runs the backend's setup on update and needs the project for it.
        ls.ml.update(existing.id, project=project_id, url=backend.url, **wanted)
        log.info("updated %s (ML backend %d)", backend.title, existing.id)
    else:
        log.info("%s already connected (ML backend %d)", backend.title, existing.id)
    return existing.id


def run(settings: Settings) -> dict[str, Any]:
    started = time.monotonic()
    studio_api.wait_http(f"{settings.studio_base_url}/health", started + settings.ready_timeout, "Label Studio")
    with bootstrap_turn(settings):  # several replicas on one database: one at a time
        return converge(settings, started)


def converge(settings: Settings, started: float) -> dict[str, Any]:
    ls = studio_api.sdk(settings)
    state = app_state.read(settings)
    state["project_id"] = converge_project(ls, settings, state)
    app_state.write(settings, state)
    # The storages script (a Label Studio process of its own, seconds of start-up) runs while the ML backends are
    # connected: neither needs the other, and the backends are often still loading their models.
    with ThreadPoolExecutor(1) as pool:
        storages = pool.submit(studio.converge_file_storages, settings, state["project_id"])
        state["ml_backends"] = {
            role: converge_backend(ls, settings, state["project_id"], backend)
            for role, backend in backends(settings).items()
        }
        files = storages.result()
    state["journal_storage_id"] = files["journal"]  # None when shared: gcs_bootstrap sets it
    if files["journal_created"]:
        log.info("created the annotation journal (export storage %d) at %s", files["journal"], settings.journal_dir)
    if files["images_moved"]:
        log.info("moved the images storage under %s (%d images kept)", settings.files_root, files["images_moved"])
    state["local_storage_id"] = converge_local_storage(ls, settings, state["project_id"])  # after: links re-keyed
    app_state.write(settings, state)
    # Cloud storages last: a wrong bucket or key must not keep the ML connections from being made.
    state.update(gcs_bootstrap.converge(ls, settings, state))  # raises gcs.GcsError: one line, exit 2
    state["bootstrapped_at"] = time.time()
    app_state.write(settings, state)
    log.info("bootstrap done in %.1f s: project %d ready", time.monotonic() - started, state["project_id"])
    return state
