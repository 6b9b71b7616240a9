"""`appliance predict --all`: pre-annotate the whole project with the serving model, resumably.

Tasks that already hold a prediction of the serving version are skipped, so an interrupted run continues where
it stopped. Batches go through the prediction backend (the same code path as Label Studio's own calls) and
each result is written back through Label Studio's API.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
from tqdm import tqdm

from appliance.labelstudio import state as app_state
from appliance.labelstudio import client as studio_api
from appliance.settings import Settings

log = logging.getLogger("predict.bulk")


class BulkError(RuntimeError):
    pass


@dataclass
class Summary:
    version: str
    total: int = 0
    skipped: int = 0
    predicted: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tasks_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0


class Studio(studio_api.Studio):
    """The Label Studio calls bulk prediction needs."""

    def tasks(self, project_id: int) -> list[dict]:
        # The export lists every task without side effects (the Data Manager list would trigger predictions).
        return self.get(f"/api/projects/{project_id}/export", "exporting the tasks",
                        params={"exportType": "JSON", "download_all_tasks": "true"})

    def predicted(self, project_id: int, version: str) -> set[int]:
        """Ids of the tasks that already hold a prediction of ``version``."""
        predictions = self.get("/api/predictions", "listing predictions", params={"project": project_id})
        return {p["task"] for p in predictions if p.get("model_version") == version}

    def save_predictions(self, project_id: int, items: list[tuple[int, dict]]) -> None:
        """One bulk request per batch (Label Studio's import/predictions), not one call per task."""
        body = [{"task": task_id, "result": r["result"], "score": r.get("score"), "model_version": r["model_version"]}
                for task_id, r in items]
        self.post(f"/api/projects/{project_id}/import/predictions", "saving predictions", json=body)


class Backend:
    def __init__(self, settings: Settings):
        self.url = settings.predict_base_url
        self.auth = settings.backend_credentials

    def version(self) -> str:
        health = requests.get(f"{self.url}/health", auth=self.auth, timeout=10).json()
        if not health.get("ready"):
            raise BulkError(health.get("message") or "the prediction backend has no model yet")
        return health["model_version"]

    def predict(self, tasks: list[dict], label_config: str, project_id: int) -> list[dict]:
        body = {"tasks": tasks, "label_config": label_config, "project": str(project_id)}
        response = requests.post(f"{self.url}/predict", json=body, auth=self.auth, timeout=600)
        response.raise_for_status()
        return response.json()["results"]


def predict_all(settings: Settings, batch: int | None = None, show_progress: bool = True,
                only_unlabeled: bool = False) -> Summary:
    project_id = app_state.project_id(settings)
    if not project_id:
        raise BulkError("the project is not bootstrapped yet; start the appliance first")
    studio, backend = Studio(settings), Backend(settings)
    summary = Summary(version=backend.version())
    label_config = studio.label_config(project_id)
    tasks = studio.tasks(project_id)
    done = studio.predicted(project_id, summary.version)
    pending = [t for t in tasks if t["id"] not in done and not (only_unlabeled and t.get("annotations"))]
    summary.total, summary.skipped = len(tasks), len(tasks) - len(pending)
    batch = batch or settings.predict_batch
    began = time.monotonic()
    # Saving a batch overlaps with predicting the next one (the model, not Label Studio, should be the bottleneck).
    with ThreadPoolExecutor(max_workers=1) as saver, tqdm(
            total=len(pending), desc=f"pre-annotating with {summary.version}", unit="task",
            disable=not show_progress) as bar:
        saving = None
        for start in range(0, len(pending), batch):
            chunk = pending[start:start + batch]
            results = backend.predict([{"id": t["id"], "data": t["data"]} for t in chunk], label_config, project_id)
            results = [r if isinstance(r, dict) else {"error": "no model to predict with"} for r in results]
            ready = [(t["id"], r) for t, r in zip(chunk, results) if "result" in r]
            summary.failed += [r.get("error", f"task {t['id']}: no result") for t, r in zip(chunk, results)
                               if "result" not in r]
            if saving is not None:
                saving.result()
            saving = saver.submit(studio.save_predictions, project_id, ready) if ready else None
            summary.predicted += len(ready)
            bar.update(len(chunk))
        if saving is not None:
            saving.result()
    summary.seconds = time.monotonic() - began
    return summary
