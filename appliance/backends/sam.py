"""Interactive Segment Anything backend: the model adapter between the protocol and the SAM engine.

Clicks, negative clicks and boxes become one mask per object (``models/sam/objects.py`` decides which click
belongs to which object, and feeds each object's previous mask back to SAM; a click on a pre-annotated mask of
the label refines it: Label Studio sends the task's predictions along), written in the template's kinds:
a brush and a polygon when it has them, else a tight box. Embeddings come from a byte-bounded cache keyed by image
content; one encoder thread computes them ahead for the tasks the annotator will open next, so a click only runs
the decoder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import cv2
import numpy as np

from appliance.backends import serve
from appliance.labelstudio import labeling
from appliance.labelstudio.images import ImageError, ImageFetcher, decode_image
from appliance.labelstudio.labeling import LabelingError
from appliance.backends.prefetch import Prefetcher
from appliance.backends.prompts import Prompts, select_prompts
from appliance.backends.protocol import Backend, BadRequest, PredictRequest, SetupRequest
from appliance.labelstudio.url_memo import UrlMemo
from appliance.models.sam.cache import EmbeddingCache, content_key
from appliance.models.sam.engine import Embedding, PromptError, SamEngine
from appliance.models.sam.masks import brush_rle_to_mask
from appliance.models.sam.objects import Click, ObjectSegmenter
from appliance.models.sam.seeds import Seed
from appliance.models.sam.store import EmbeddingStore
from appliance.settings import Settings
from appliance.shared.embeddings import shared_embeddings

log = logging.getLogger("sam")

class NotReady(RuntimeError):
    pass


URL_MEMO_SECONDS = 300  # how long a URL is trusted to still hold the same bytes (saves a download per click)
URL_MEMO_ENTRIES = 4096  # URLs remembered at most (least recently used forgotten first)
OBJECT_MEMORY_MB = 64  # each pending object's last decode (bit-packed mask + 256 KB of logits), for its next click


class SamBackend(Backend):
    name = "sam"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: SamEngine | None = None
        self.load_error: str | None = None
        self.encoder_error: str | None = None
        self.cache = EmbeddingCache(settings.sam_cache_mb * 1024 * 1024)
        # On disk, shared: the trainer and the prediction backend read the embeddings computed here.
        self.store = EmbeddingStore(settings.embeddings_dir, settings.embedding_store_mb * 1024 * 1024,
                                    settings.sam_model_type, remote=shared_embeddings(settings)
                                    ) if settings.embedding_store_mb > 0 else None
        self.fetcher = ImageFetcher.from_settings(settings)
        self._url_keys = UrlMemo(URL_MEMO_ENTRIES, URL_MEMO_SECONDS)
        self.prefetcher = Prefetcher(settings, self.warm)
        self.object_memory = EmbeddingCache(OBJECT_MEMORY_MB * 1024 * 1024)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._load, name="sam-load", daemon=True).start()

    def _load(self) -> None:
        began = time.monotonic()
        try:
            engine = SamEngine(self.settings.sam_checkpoint, self.settings.sam_model_type, self.settings.device)
        except Exception as error:  # reported in /health; the service stays up to say so
            self.load_error = str(error)
            log.error("SAM model not loaded: %s", error)
            return
        runtime = self.settings.sam_encoder
        onnx = runtime != "torch" and engine.device.type == "cpu"
        if onnx:  # the install's export loads in a second: before any encode, so PyTorch's never allocates
            with contextlib.suppress(Exception):
                engine.use_onnx(None, self.settings.encoder_threads, runtime)
        self.engine = engine
        log.info("SAM %s loaded on %s (encoder: %s) in %.1f s", engine.model_type, engine.device, engine.encoder_name,
                 time.monotonic() - began)
        self.prefetcher.start()
        if onnx and engine.encoder_name == "torch":
            self._export_onnx(engine)

    def _export_onnx(self, engine: SamEngine) -> None:
        """Clicks are served with PyTorch's encoder until this checkpoint's export is ready; a failure keeps it."""
        began = time.monotonic()
        try:
            engine.use_onnx(self.settings.onnx_dir, self.settings.encoder_threads, self.settings.sam_encoder)
        except Exception as error:
            self.encoder_error = f"{type(error).__name__}: {error}".splitlines()[0]
            log.warning("SAM image encoder stays on PyTorch (the ONNX export or its engine failed: %s)",
                        self.encoder_error)
            return
        log.info("SAM image encoder on %s (ready in %.1f s)", engine.encoder_name, time.monotonic() - began)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model_version(self) -> str:
        return f"sam-{self.settings.sam_model_type}"

    def status(self) -> dict:
        return {"error": self.load_error, "cache": self.cache.stats(), "url_memo": self._url_keys.stats(),
                "prefetch_queue": self.prefetcher.pending(), "object_memory": self.object_memory.stats(),
                "device": str(self.engine.device) if self.engine else None,
                "encoder": self.engine.encoder_name if self.engine else None, "encoder_error": self.encoder_error}

    def setup(self, req: SetupRequest) -> None:
        if req.schema:
            self.prefetcher.remember_config(req.schema)
        if req.project:
            self.prefetcher.after_task(req.project.split(".")[0], None)

    def on_event(self, event: str, payload: dict) -> None:
        self.prefetcher.on_event(event, payload)

    # --- embeddings ----------------------------------------------------------------------------
    def embedding(self, url: str, task_id: int | None) -> tuple[Embedding, str]:
        """The embedding of the image at ``url`` and the image's content key: from the cache, or fetched, decoded
        and encoded once."""
        engine = self._engine()
        key = self._known_key(url)
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached, key
        data = self.fetcher.fetch(url, task_id)
        key = content_key(data)
        self._url_keys.put(url, key)
        return self.cache.get_or_compute(key, lambda: self._embed(engine, key, data)), key

    def _embed(self, engine: SamEngine, key: str, data: bytes) -> Embedding:
        """From the shared store when another process (or an earlier run) encoded this image, else encoded here
        and stored for the others."""
        image = decode_image(data, self.settings.image_max_megapixels * 1_000_000)
        stored = self.store.get(key) if self.store is not None else None
        if stored is not None:
            return engine.from_features(stored, image.shape[:2])
        embedding = engine.embed(image)
        if self.store is not None:
            try:
                self.store.put(key, embedding.features.float().cpu().numpy())
            except OSError as error:  # a full disk costs the others an encode, never this click
                log.warning("embedding not stored: %s", error)
        return embedding

    def warm(self, url: str, task_id: int | None) -> None:
        self.embedding(url, task_id)

    def _known_key(self, url: str) -> str | None:
        return self._url_keys.get(url)

    def _engine(self) -> SamEngine:
        if self.engine is None:
            raise NotReady(self.load_error or "the SAM model is still loading; try again in a few seconds")
        return self.engine

    # --- predict -------------------------------------------------------------------------------
    def predict(self, req: PredictRequest) -> list[dict]:
        if not req.interactive:
            return [[] for _ in req.tasks]  # SAM answers prompts; pre-annotations come from the prediction backend
        if not req.label_config:
            raise BadRequest("'label_config' is required for an interactive request")
        task = req.tasks[0] if req.tasks else None
        if task is None:
            raise BadRequest("an interactive request needs one task")
        try:
            result = self._segment(task, req)
        except (PromptError, ImageError, LabelingError, NotReady) as error:
            # Label Studio passes a 200's body to the editor but drops a 4xx's: the message rides in the result.
            log.info("task %s: %s", task.get("id"), error)
            result = {"result": [], "error": f"task {task.get('id')}: {error}", "model_version": self.model_version}
        if req.project:
            self.prefetcher.after_task(req.project.split(".")[0], task.get("id"))
        return [result] + [{"result": []} for _ in req.tasks[1:]]

    def _segment(self, task: dict, req: PredictRequest) -> dict:
        spec = labeling.parse(req.label_config)
        prompts = select_prompts(req.context or {})
        for control in labeling.output_controls(spec):
            spec.check_label(control, prompts.label)
        size = prompts.original_size
        if size and size[0] * size[1] > self.settings.image_max_megapixels * 1_000_000:
            raise PromptError(f"original size {size[1]}x{size[0]} is over APPLIANCE_IMAGE_MAX_MEGAPIXELS")
        embedding, key = self.embedding(labeling.image_url(task, spec.image_key), task.get("id"))
        segmenter = ObjectSegmenter(self._engine(), self.object_memory)
        seeds = _seeds(task, prompts.label, embedding.original_size)
        objects = segmenter.segment(embedding, key, _clicks(prompts, embedding.original_size), seeds)
        regions = []
        for obj in objects:
            regions += labeling.mask_regions(spec, _to_size(obj.mask, size), prompts.label, obj.score)
        return {"result": regions, "score": round(objects[-1].score, 4), "model_version": self.model_version}


def _clicks(prompts: Prompts, size: tuple[int, int]) -> list[Click]:
    """Label Studio's percentages as pixels of the image SAM encoded."""
    height, width = size
    clicks = []
    for item in prompts.items:
        if item.box is not None:
            x, y, w, h = item.box
            clicks.append(Click(box=(x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100)))
        else:
            clicks.append(Click(point=(item.point[0] * width / 100, item.point[1] * height / 100),
                                positive=item.positive))
    return clicks


def _seeds(task: dict, label: str, size: tuple[int, int]) -> list[Seed]:
    """The pre-annotated masks of ``label`` in the task's newest prediction (the one the editor shows; Label Studio
    sends the task's predictions with each interactive request), in the frame SAM encoded: a click on one refines
    it. A region that does not decode is no seed (the click is then an ordinary one)."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if not predictions:
        return []
    seeds = []
    for region in max(predictions, key=_created).get("result") or []:
        value = region.get("value") if isinstance(region, dict) else None
        if not isinstance(value, dict) or region.get("type") != "brushlabels" \
                or value.get("brushlabels") != [label] or value.get("format") != "rle":
            continue
        try:
            mask = brush_rle_to_mask(value["rle"], int(region["original_height"]), int(region["original_width"]))
        except (KeyError, TypeError, ValueError):
            continue
        score = region.get("score")
        seeds.append(Seed(_to_size(mask, size), float(score) if isinstance(score, (int, float)) else 0.0))
    return seeds


def _created(prediction: dict) -> tuple[str, int]:
    number = prediction.get("id")
    return str(prediction.get("created_at") or ""), number if isinstance(number, int) else 0


def _to_size(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Masks must match the size Label Studio shows (original_width x original_height)."""
    if size is None or mask.shape == size:
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def create_app():
    return serve.build(SamBackend)
