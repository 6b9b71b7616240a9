"""The trainer process: annotations in, a better model out, with no one pressing a button.

Watches the annotation journal (and the request folder that `appliance train` and Label Studio's "Start training"
write to), debounces, then runs one job at a time: dataset -> training subprocess -> evaluation on held-out tasks
-> publish only if its pre-annotations save the annotator actions (policy.py) -> prune -> re-predict unlabeled
tasks. Any failure leaves the serving model untouched and is reported in ``<data>/trainer/status.json``
(shown by `appliance status`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance.labelstudio import state as app_state
from appliance.models.detection.configs import resolve_arch
from appliance.supervise import die_with_parent
from appliance.trainer import init, journal, policy
from appliance.trainer.schedule import Schedule
from appliance.trainer.spec import TrainingJob
from appliance.trainer.status import StatusFile
from appliance.settings import Settings
from appliance.shared.lock import Hold, training_lock
from appliance.shared.run_requests import requests_dir

log = logging.getLogger("trainer")

DISK_RETRY_S = (20, 600)  # after a run failed on a full disk: first wait before trying again, longest wait
STEP_RETRY_S = 30  # after an unexpected error in the loop itself


class TrainingFailed(RuntimeError):
    pass


class Trainer:
    def __init__(self, settings: Settings, build=None):
        from appliance.shared.registry import open_registry
        from appliance.trainer.build import build_datasets

        self.settings = settings
        self.build = build or build_datasets  # (settings, work dir) -> Datasets
        self.registry = open_registry(settings)
        self.status = StatusFile(settings.trainer_dir / "status.json")
        self.schedule = Schedule(settings.train_min_new, settings.train_quiet_seconds)
        self.requests = requests_dir(settings)
        self.wake = threading.Event()
        self.timings: dict[str, float] = {}
        self.started_from: str | None = None  # the version serving when the current run began
        self.journal_until: float | None = None  # the newest journal file the current run trains on
        self.hold = Hold(True)  # the training lock of the current run
        self.retry_at: float | None = None  # a run that failed on a full disk is tried again from then
        self.retry_wait = DISK_RETRY_S[0]
        self._last_lap = time.monotonic()
        self.watcher = journal.JournalWatcher([settings.journal_dir, self.requests], self.wake)

    # --- the loop ------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> None:
        from appliance.trainer.instructions import InstructionsWriter

        stop = stop or threading.Event()
        if self.settings.shared_state:
            from appliance.shared.journal import JournalMirror

            JournalMirror(self.settings).start(stop)  # other machines' annotations, into the watched folder
        self.watcher.start()
        InstructionsWriter(self.settings, self.status.read, self.registry).start(stop)
        since = self.status.read().get("last_run_started", 0.0)
        self.watcher.seed(*journal.changed_since(self.settings.journal_dir, since))
        log.info("watching %s (run after %d annotation(s) or %d s quiet)", self.settings.journal_dir,
                 self.settings.train_min_new, self.settings.train_quiet_seconds)
        while not stop.is_set():
            self.wake.wait(5)
            self.wake.clear()
            try:
                self.tick()
            except Exception as error:  # never a crash loop (a full disk, a vanished folder): report, wait, retry
                log.error("trainer step failed: %s; trying again in %d s", error, STEP_RETRY_S)
                self._retry_later(error)
                stop.wait(STEP_RETRY_S)

    def tick(self) -> dict | None:
        changed, last_change = self.watcher.pending(self.settings.journal_dir)
        requests = sorted(self.requests.glob("*.json")) if self.requests.exists() else []
        self.status.update(pending_changes=changed)
        retry = self.retry_at is not None and time.time() >= self.retry_at
        reason = self.schedule.due(changed, last_change, bool(requests) or retry, time.time())
        if reason is None:
            return None
        if retry and not requests:
            reason = "retry after a full disk"
        outcome = self.run(reason, waited=time.time() - last_change if last_change else None, requests=requests)
        if outcome.get("result") == "published" and self.settings.repredict:
            self._repredict_after(outcome)  # outside the training lock: another run may start meanwhile
        if outcome.get("result") == "published" and self.settings.gcs_target_bucket:
            self._export_dataset(outcome)
        return outcome

    def _export_dataset(self, outcome: dict) -> None:
        """The version's training set, as COCO, beside the annotations in the target bucket; a failure is reported
        and changes nothing else (the version is published and serves)."""
        from appliance.export.run import publish_dataset

        self.status.update(stage="export")
        try:
            outcome["dataset_export"] = publish_dataset(self.settings, outcome["version"])
        except Exception as error:  # noqa: BLE001 - the bucket being down must not stop the trainer
            outcome["dataset_export"] = f"failed: {str(error).splitlines()[0][:200] if str(error) else error!r}"
        log.info("run %s: dataset export %s", outcome.get("run"), outcome["dataset_export"])
        self.status.update(stage=None, last=outcome)

    # --- one run -------------------------------------------------------------------------------
    def _lap(self, stage: str) -> None:
        """Seconds spent in ``stage`` since the previous lap (the benchmark's split of a run)."""
        now = time.monotonic()
        self.timings[stage] = round(now - self._last_lap, 2)
        self._last_lap = now

    def run(self, reason: str, waited: float | None = None, requests: list[Path] = ()) -> dict:
        with training_lock(self.settings) as hold:
            self.hold = hold
            if not hold:  # the requests stay on disk: they are served when the other run is done
                if not self.status.read().get("busy_since"):
                    log.info("a training run is already in progress elsewhere; %s waits", reason)
                    self.status.update(busy_since=time.time())
                self.status.update(busy_at=time.time())
                return {"result": "busy"}
            self.status.update(busy_since=None)
            self.registry.pull(force=True)  # what another machine published while this one waited
            if self.settings.shared_state and not requests and self._covered_by_serving():
                self.watcher.mark(self.settings.journal_dir)
                log.info("the serving model was trained on these annotations already (by another trainer)")
                self.status.update(up_to_date_at=time.time())
                return {"result": "up to date"}
            for path in requests:
                path.unlink(missing_ok=True)
            self.watcher.mark(self.settings.journal_dir)
            run_id = time.strftime("%Y%m%dT%H%M%S")
            began = time.time()
            self.timings = {"wait": round(waited, 2)} if waited is not None else {}
            self._last_lap = time.monotonic()
            self.status.update(state="running", run=run_id, reason=reason, stage="dataset", last_run_started=began,
                               epoch=None, loss=None, eta_s=None, error=None)
            log.info("run %s started: %s", run_id, reason)
            try:
                outcome = self._run(run_id)
            except Exception as error:  # a failed run never touches the serving model
                log.error("run %s failed: %s", run_id, error)
                outcome = {"result": "failed", "error": str(error)}
            outcome.update(run=run_id, seconds=round(time.time() - began, 1), reason=reason, timings=self.timings)
            if outcome["result"] == "failed" and self._retry_later(outcome["error"]):
                outcome["error"] += f"; trying again in {self.retry_at - time.time():.0f} s"
            elif outcome["result"] != "failed":
                self.retry_at, self.retry_wait = None, DISK_RETRY_S[0]
            self.status.update(state="failed" if outcome["result"] == "failed" else "idle", stage=None,
                               last=outcome, error=outcome.get("error"))
            log.info("run %s: %s", run_id, json.dumps(outcome))
            return outcome

    def _covered_by_serving(self) -> bool:
        """Counted from what the serving model was trained on, the journal holds too few changes for a run: another
        trainer sharing the journal ran while this one waited for the lock."""
        serving = self.registry.current()
        until = serving.metrics.get("journal_until") if serving else None
        if until is None:
            return False
        fresh, newest = journal.changed_since(self.settings.journal_dir, until)
        return self.schedule.due(len(fresh), newest, False, time.time()) is None

    def _retry_later(self, error) -> bool:
        """After a full disk, try the run again later (waits double up to a limit); True when scheduled."""
        if not _disk_full(error):
            return False
        self.retry_at = time.time() + self.retry_wait
        self.retry_wait = min(self.retry_wait * 2, DISK_RETRY_S[1])
        return True

    def _run(self, run_id: str) -> dict:
        work = self.settings.trainer_dir / "runs" / run_id
        shutil.rmtree(work, ignore_errors=True)
        serving = self.registry.current()
        self.started_from = serving.version if serving else None
        self.journal_until = journal.changed_since(self.settings.journal_dir, 0)[1]  # what this run trains on
        try:
            datasets = self.build(self.settings, work)
            self._lap("dataset")
            self.status.update(stage="train", dataset=datasets.summary())
            metrics = self._train(work, datasets)
            return self._decide(work / "model", metrics, datasets)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _train(self, work: Path, datasets) -> dict:
        current = self.registry.current()
        # Only labels with a training example: a model never predicts a class it has not seen.
        classes = datasets.trained_labels()
        arch = resolve_arch(self.settings.train_arch, datasets.train / "annotations.json")
        self.status.update(arch=arch)
        labels_of = init.class_labels(self.settings, datasets.spec)
        serving = {}
        if current is not None:
            serving = dict(current=current.path, current_labels=init.labels_for(current.path, labels_of),
                           current_thresholds=current.metrics.get("thresholds") or {},
                           score_threshold=self.settings.score_threshold)
        store = self.settings.embedding_store_mb > 0  # the SAM embeddings the SAM backend stored for the clicks
        job = TrainingJob(
            train=datasets.train, holdout=datasets.holdout, out=work / "model", classes=classes, arch=arch,
            epochs=self.settings.train_epochs, img_size=self.settings.train_img_size,
            batch_size=self.settings.train_batch, threads=self.settings.train_threads, device=self.settings.device,
            sam_model_type=self.settings.sam_model_type, sam_checkpoint=self.settings.sam_checkpoint,
            embeddings=self.settings.embeddings_dir if store else None, embeddings_mb=self.settings.embedding_store_mb,
            **init.init_fields(self.settings, current.path if current else None, classes, labels_of, arch), **serving)
        command = [sys.executable, "-m", "appliance.trainer.job", str(job.write(work / "job.json"))]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.settings.train_threads)}
        # The job dies with the trainer, even a trainer killed with -9: no training run outlives the appliance.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=die_with_parent)
        limit = self.settings.train_timeout_minutes * 60
        fired: list[bool] = []
        # A hung or endless run must not hold the lock (and the CPU) forever.
        timer = threading.Timer(limit, lambda: (fired.append(True), proc.kill()))
        timer.daemon = True
        timer.start()
        try:
            return self._follow(proc)
        except TrainingFailed:
            if fired:
                raise TrainingFailed(f"training took over {self.settings.train_timeout_minutes:g} min and was stopped "
                                     f"(APPLIANCE_TRAIN_TIMEOUT_MINUTES)") from None
            raise
        finally:
            timer.cancel()

    def _follow(self, proc: subprocess.Popen) -> dict:
        metrics, error = None, None
        stderr_tail: list[str] = []
        reader = threading.Thread(target=_tail, args=(proc.stderr, stderr_tail), daemon=True)
        reader.start()
        last_log = 0.0
        for line in proc.stdout:
            event = _json(line)
            if event is None:
                continue
            if event.get("event") == "iter":
                self.status.update(epoch=event.get("epoch"), max_epochs=event.get("max_epochs"),
                                   iter=event.get("iter"), max_iters=event.get("max_iters"),
                                   loss=event.get("loss"), eta_s=event.get("eta_s"))
                if time.time() - last_log > 15:
                    last_log = time.time()
                    log.info("epoch %s/%s iter %s/%s loss %.3f, about %.0f s left", event.get("epoch"),
                             event.get("max_epochs"), event.get("iter"), event.get("max_iters"),
                             event.get("loss") or 0, event.get("eta_s") or 0)
            elif event.get("event") == "done":
                self._lap("train")
                self.status.update(stage="evaluate")
            elif event.get("event") == "metrics":
                self._lap("evaluate")
                metrics = event
            elif event.get("event") == "error":
                error = event.get("error")
        code = proc.wait()
        reader.join(5)
        if code != 0 or metrics is None:
            detail = error or (stderr_tail[-1] if stderr_tail else f"exit code {code}")
            raise TrainingFailed(f"training job failed: {detail}")
        return metrics

    def _decide(self, model_dir: Path, metrics: dict, datasets) -> dict:
        candidate, current = metrics.get("candidate"), metrics.get("current")
        serving = self.registry.current()
        self.status.update(stage="evaluate")
        decision = policy.decide(candidate, current, serving is not None)
        if not decision.publish:
            return {"result": "rejected", "candidate": candidate, "serving": current, "why": decision.why}
        now = self.registry.current()
        if (now.version if now else None) != self.started_from:
            # Someone chose the serving model during the run (`appliance model use` or `import`): theirs stands.
            return {"result": "rejected", "candidate": candidate, "serving": current,
                    "why": f"the serving model changed during the run ({self.started_from} -> "
                           f"{now.version if now else None}, by `appliance model use` or `import`); not published "
                           "over that choice"}
        if not self.hold.still_held():
            return {"result": "rejected", "candidate": candidate, "serving": current,
                    "why": "the training lock was lost during the run (its database session ended, or another trainer "
                           "took the lease over); not published, another run may have started"}
        self.status.update(stage="publish")
        from appliance.trainer.build import keep_snapshot

        keep_snapshot(datasets, model_dir)
        version = self.registry.publish(model_dir, {**(candidate or {}), "baseline": current,
                                                    "journal_until": self.journal_until, **datasets.summary()})
        self.registry.prune(self.settings.keep_versions)
        self._lap("publish")
        return {"result": "published", "version": version, "candidate": candidate, "previous": current,
                "why": decision.why}

    def _repredict_after(self, outcome: dict) -> None:
        self.status.update(stage="repredict")
        outcome["repredicted"] = self._repredict(outcome["version"])
        self.status.update(stage=None, last=outcome)
        log.info("run %s: re-predicted %s", outcome.get("run"), outcome["repredicted"])

    def _repredict(self, version: str) -> int | str:
        from appliance.labelstudio import bulk_predict

        deadline = time.time() + 120
        backend = bulk_predict.Backend(self.settings)
        while time.time() < deadline:
            try:
                if backend.version() == version:
                    self._lap("swap")
                    summary = bulk_predict.predict_all(self.settings, show_progress=False, only_unlabeled=True)
                    self._lap("repredict")
                    return summary.predicted
            except Exception as error:  # the new model serves even if re-prediction cannot run now
                last = str(error)
            time.sleep(1)
        return f"skipped: prediction backend did not serve {version} ({locals().get('last', 'timeout')})"


def _disk_full(error) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _json(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def _tail(stream, keep: list[str], limit: int = 50) -> None:
    for line in stream:
        sys.stdout.write(line)  # the job's own log goes to the trainer's output
        keep.append(line.strip())
        del keep[:-limit]


def serve(settings: Settings) -> None:
    if not app_state.project_id(settings):
        log.info("waiting for the bootstrap to create the project")
    Trainer(settings).serve()
