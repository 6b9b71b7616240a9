"""Pre-annotation backend: the model adapter between the protocol and the MMDetection detector.

Every detection becomes a BrushLabels mask (or a polygon when the template has PolygonLabels instead) and its
RectangleLabels box, with the project's label, a per-region score, a task score (the mean, so the Data Manager can
sort least-confident first) and the serving model_version. It never trains and never invents predictions:
with no model in the registry it answers with none and says so in /health.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from appliance.backends import serve
from appliance.labelstudio import labeling
from appliance.backends.hotswap import ModelSlot
from appliance.labelstudio.images import ImageError, ImageFetcher, decode_image
from appliance.labelstudio.label_map import LabelMapper, parse_label_map
from appliance.labelstudio.labeling import LabelingError, LabelingSpec
from appliance.backends.protocol import Backend, PredictRequest, SetupRequest
from appliance.settings import Settings

log = logging.getLogger("predict")

NO_MODEL = "no-model"


class PredictBackend(Backend):
    name = "predict"

    def __init__(self, settings: Settings):
        from appliance.shared.registry import open_registry

        self.settings = settings
        # With a shared registry, another machine's publish is noticed at the shared poll (no inotify across hosts).
        poll = settings.shared_poll_seconds if settings.shared_state else 10.0
        self.slot = ModelSlot(open_registry(settings), self._load, poll_seconds=poll)
        self.fetcher = ImageFetcher.from_settings(settings)
        self.mappers: dict[str, LabelMapper] = {}
        self.loader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image")
        self.schema: str | None = None
        self.metrics: dict[str, dict] = {}  # version -> its held-out figures, as loaded

    def _load(self, version):
        from appliance.models.detection.model import Detector
        from appliance.models.sam.store import use_remote_tier
        from appliance.shared.embeddings import shared_embeddings

        use_remote_tier(lambda: shared_embeddings(self.settings))  # sam-det's store: the machines' shared tier
        store = self.settings.embeddings_dir if self.settings.embedding_store_mb > 0 else None
        self.metrics[version.version] = version.metrics or {}
        # The thresholds the trainer chose for this version (least annotator cost on held-out); the setting for
        # versions without them (imported or pretrained weights).
        return Detector(version.path, device=self.settings.device, score_threshold=self.settings.score_threshold,
                        batch_size=self.settings.predict_batch, embedding_store=store,
                        embedding_store_mb=self.settings.embedding_store_mb,
                        class_thresholds=(version.metrics or {}).get("thresholds"))

    def start(self) -> None:
        self.slot.start()
        if self.settings.detector_weights and self.slot.registry.current() is None:
            threading.Thread(target=self._seed_pretrained, name="pretrained", daemon=True).start()

    def _seed_pretrained(self) -> None:
        """First boot with APPLIANCE_DETECTOR_WEIGHTS: serve them until the trainer publishes a better model."""
        from appliance.models.detection.pretrained import import_pretrained, resolve_classes

        try:
            version = import_pretrained(self.settings.detector_weights, self.slot.registry,
                                        resolve_classes(self.settings.detector_classes), self.settings.train_arch)
            log.info("pretrained weights %s published as %s", self.settings.detector_weights.name, version)
        except Exception as error:  # the backend stays up and says so
            self.slot.error = f"APPLIANCE_DETECTOR_WEIGHTS: {error}"
            log.error("APPLIANCE_DETECTOR_WEIGHTS could not be used: %s", error)

    @property
    def ready(self) -> bool:
        return self.slot.get() is not None

    @property
    def model_version(self) -> str:
        serving = self.slot.get()
        return serving.version if serving else NO_MODEL

    def status(self) -> dict:
        serving = self.slot.get()
        if serving is None and self.slot.failed:
            message = self.slot.error  # a version exists but failed to load: "no model yet" would mislead
        elif serving is None:
            message = ("no model yet: submit annotations and the trainer publishes one "
                       "(or set APPLIANCE_DETECTOR_WEIGHTS)")
        else:
            message = None
        return {"message": message, "loading": self.slot.loading, "error": self.slot.error,
                "default_threshold": self.settings.score_threshold, **self._serving_figures(serving)}

    def _serving_figures(self, serving) -> dict:
        """The thresholds the serving version applies and what it saves on held-out tasks."""
        if serving is None:
            return {"thresholds": None, "saving": None}
        from appliance.models.detection.cost import saving  # imports torch, as the serving model did

        return {"thresholds": getattr(serving.model, "class_thresholds", None),
                "saving": saving(self.metrics.get(serving.version))}

    def setup(self, req: SetupRequest) -> None:
        if req.schema:
            self.schema = req.schema

    def on_event(self, event: str, payload: dict) -> None:
        if event == "START_TRAINING":  # Label Studio's "Start training" button: the trainer does the work
            from appliance.shared.run_requests import request_run

            request_run(self.settings, "Label Studio: Start training")

    def versions(self) -> list[str]:
        return [v.version for v in self.slot.registry.list()] or [NO_MODEL]

    # --- predict -------------------------------------------------------------------------------
    def predict(self, req: PredictRequest) -> list[dict]:
        serving = self.slot.get()  # the whole request uses this model, even if a swap happens meanwhile
        if serving is None:
            # One empty list per task: "no prediction" that Label Studio accepts silently (an empty "results"
            # makes it log an ERROR for every task opened; label_studio/ml/models.py).
            return [[] for _ in req.tasks]
        config = req.label_config or self.schema
        if not config:
            return [{"error": "no labeling config in the request"} for _ in req.tasks]
        try:
            spec = labeling.parse(config)
        except LabelingError as error:
            return [{"error": str(error)} for _ in req.tasks]
        images, keys, errors = self._images(req.tasks, spec)
        ok = [i for i in range(len(req.tasks)) if i not in errors]
        detections = serving.model.predict_batch([images[i] for i in ok], keys=[keys[i] for i in ok]) if ok else []
        by_task = dict(zip(ok, detections))
        mapper = self._mapper(config, spec)
        return [self._result(spec, mapper, images[i], by_task[i], serving.version) if i in by_task
                else {"error": errors[i]} for i in range(len(req.tasks))]

    def _images(self, tasks: list[dict], spec: LabelingSpec
                ) -> tuple[dict[int, np.ndarray], dict[int, str], dict[int, str]]:
        """Fetch and decode every task's image, a few at a time (I/O while the model waits); with each, the content
        key of its bytes (where a sam-det model finds the embedding the SAM backend stored)."""
        from appliance.models.sam.cache import content_key

        max_pixels = self.settings.image_max_megapixels * 1_000_000

        def load(task: dict) -> tuple[np.ndarray, str]:
            data = self.fetcher.fetch(labeling.image_url(task, spec.image_key), task.get("id"))
            return decode_image(data, max_pixels), content_key(data)

        images, keys, errors = {}, {}, {}
        futures = {i: self.loader.submit(load, task) for i, task in enumerate(tasks)}
        for i, future in futures.items():
            try:
                images[i], keys[i] = future.result()
            except (ImageError, LabelingError) as error:  # this task fails, the others go on
                log.info("task %s: %s", tasks[i].get("id"), error)
                errors[i] = f"task {tasks[i].get('id')}: {error}"
        return images, keys, errors

    def _mapper(self, config: str, spec: LabelingSpec) -> LabelMapper:
        if config not in self.mappers:
            self.mappers[config] = LabelMapper(spec, parse_label_map(self.settings.label_map))
        return self.mappers[config]

    def _result(self, spec: LabelingSpec, mapper: LabelMapper, image: np.ndarray, found: list, version: str) -> dict:
        size = image.shape[:2]
        regions, scores = [], []
        for det in found:
            label = mapper(det.label)
            if label is None:
                continue
            scores.append(det.score)
            regions += self._regions(spec, det, label, size)
        score = float(np.mean(scores)) if scores else 0.0
        return {"result": regions, "score": round(score, 4), "model_version": version}

    @staticmethod
    def _regions(spec: LabelingSpec, det, label: str, size: tuple[int, int]) -> list[dict]:
        from appliance.models.detection.model import exact_size

        regions = []
        if det.mask is not None and det.mask.any():  # an empty mask is no object to offer (its box still is)
            mask = exact_size(det.mask, *size)  # the region's original_width/height are the image's
            if spec.control("BrushLabels"):
                regions.append(labeling.brush_region(spec, mask, label, det.score))
            else:
                regions += labeling.polygon_regions(spec, mask, label, det.score)
        box = labeling.rectangle_region(spec, det.bbox, size, label, det.score)
        if box is not None:
            regions.append(box)
        return regions


def create_app():
    return serve.build(PredictBackend)
