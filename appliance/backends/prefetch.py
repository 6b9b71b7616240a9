"""Compute SAM embeddings before the annotator asks: one encoder worker fed with the tasks that come next.

Signals: a click on task T (the next unlabeled tasks after T), a submitted annotation on T (same), new imports
(TASKS_CREATED webhooks) and the backend's setup (the project's first unlabeled tasks). Lookups and encodes
run on the worker thread, never in a request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict, deque
from typing import Callable

from appliance.labelstudio import client as studio_api
from appliance.labelstudio import labeling
from appliance.settings import Settings

log = logging.getLogger("sam.prefetch")

Warm = Callable[[str, "int | None"], None]


def unlabeled_after(task_id: int | None) -> dict:
    items = [{"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]
    if task_id is not None:
        items.append({"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": task_id})
    return {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}


class Prefetcher:
    def __init__(self, settings: Settings, warm: Warm, memory: int = 1000):
        self.settings = settings
        self.warm = warm
        self.jobs: deque[tuple] = deque(maxlen=500)
        self.wake = threading.Condition()
        self.done: OrderedDict[int, None] = OrderedDict()  # task ids already warmed (bounded memory)
        self.memory = memory
        self.spec: labeling.LabelingSpec | None = None
        self._last_lookup: tuple[str, int | None] | None = None
        self.studio = studio_api.Studio(settings, timeout=10)
        self.thread = threading.Thread(target=self._run, name="sam-prefetch", daemon=True)

    def start(self) -> None:
        if self.settings.sam_prefetch > 0:
            self.thread.start()

    def pending(self) -> int:
        return len(self.jobs)

    def _submit(self, job: tuple) -> None:
        if self.settings.sam_prefetch <= 0:
            return
        with self.wake:
            self.jobs.append(job)
            self.wake.notify()

    def after_task(self, project_id: str, task_id: int | None) -> None:
        # Many clicks land on one task: look up what comes next once per task, not once per click.
        if (project_id, task_id) == self._last_lookup:
            return
        self._last_lookup = (project_id, task_id)
        self._submit(("lookup", project_id, task_id))

    def on_event(self, event: str, payload: dict) -> None:
        project = payload.get("project") if isinstance(payload.get("project"), dict) else {}
        if isinstance(project.get("label_config"), str):
            self.remember_config(project["label_config"])
        if event == "TASKS_CREATED":
            for task in (payload.get("tasks") or [])[: self.settings.sam_prefetch]:
                self._submit(("task", task))
        elif event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED") and isinstance(payload.get("task"), dict):
            task = payload["task"]
            self.after_task(str(task.get("project") or project.get("id")), task.get("id"))

    def remember_config(self, config: str) -> None:
        try:
            self.spec = labeling.parse(config)
        except labeling.LabelingError:
            pass

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.jobs:
                    self.wake.wait()
                job = self.jobs.popleft()
            try:
                self._do(job)
            except Exception as error:  # a task that cannot be warmed is simply cold later
                log.info("prefetch skipped: %s", error)

    def _do(self, job: tuple) -> None:
        if job[0] == "lookup":
            for task in self._next_tasks(job[1], job[2]):
                self._warm_task(task)
        else:
            self._warm_task(job[1])

    def _next_tasks(self, project_id: str, task_id: int | None) -> list[dict]:
        # Raw task data: a gs:// image must stay a URI (presigned by Label Studio on fetch), not a signed URL.
        params = {"project": project_id, "page_size": self.settings.sam_prefetch, "fields": "all",
                  "resolve_uri": "false", "query": json.dumps(unlabeled_after(task_id))}
        tasks = self.studio.get("/api/tasks", "listing the next tasks", params=params).get("tasks", [])
        if self.spec is None:
            self.remember_config(self.studio.label_config(int(project_id)))
        return tasks

    def _warm_task(self, task: dict) -> None:
        task_id = task.get("id")
        if task_id in self.done or self.spec is None:
            return
        self.warm(labeling.image_url(task, self.spec.image_key), task_id)
        self.done[task_id] = None
        while len(self.done) > self.memory:
            self.done.popitem(last=False)
        log.debug("embedding of task %s computed ahead", task_id)
