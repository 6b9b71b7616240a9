"""The ML backend protocol Label Studio 1.23 speaks, shared by every backend of the appliance.

Routes: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /versions``.
The HTTP layer knows nothing about models: a ``Backend`` (model adapter) does the work. Label Studio gives
``/health`` 1 s and ``/setup`` 3 s, so neither ever waits for a model (models load in a background thread), and
``/webhook`` (1 s) only queues the event for a single worker thread.
"""

from __future__ import annotations

import base64
import hmac
import logging
import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request itself is malformed: answered with 400 and a message saying what to fix."""


@dataclass
class PredictRequest:
    tasks: list[dict]
    project: str | None = None
    label_config: str | None = None
    context: dict | None = None
    params: dict = field(default_factory=dict)

    @property
    def interactive(self) -> bool:
        return bool(self.context)


@dataclass
class SetupRequest:
    project: str | None
    schema: str | None
    hostname: str | None
    access_token: str | None
    extra_params: dict = field(default_factory=dict)


class Backend(ABC):
    """A model behind the protocol. Subclasses hold model code adapters; they never see Flask."""

    name = "backend"

    def start(self) -> None:
        """Begin loading the model in the background. Must return at once."""

    @property
    def ready(self) -> bool:
        return True

    @property
    @abstractmethod
    def model_version(self) -> str: ...

    def status(self) -> dict[str, Any]:
        """Extra fields for /health (model state, cache stats...)."""
        return {}

    def setup(self, req: SetupRequest) -> None:
        """Remember per-project parameters. Must be fast."""

    @abstractmethod
    def predict(self, req: PredictRequest) -> list[dict]:
        """One entry per task, in order: {"result": [...], "score": float, "model_version": str},
        or {"error": "..."} for a task that failed (Label Studio then stores no prediction for it);
        an empty list when there is no model to predict with."""

    def on_event(self, event: str, payload: dict) -> None:
        """Handle a webhook event. Runs on the backend's event thread, never in the request."""

    def versions(self) -> list[str]:
        return [self.model_version]


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def parse_predict(body: dict) -> PredictRequest:
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    for task in tasks:
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"task {task.get('id')!r} has no 'data' object")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise BadRequest("'params.context' must be an object")
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest("'label_config' must be a string")
    return PredictRequest(tasks=tasks, project=_str_or_none(body.get("project")), label_config=label_config,
                          context=context, params=params)


def parse_setup(body: dict) -> SetupRequest:
    extra = body.get("extra_params")
    return SetupRequest(
        project=_str_or_none(body.get("project")),
        schema=body.get("schema") if isinstance(body.get("schema"), str) else None,
        hostname=body.get("hostname") if isinstance(body.get("hostname"), str) else None,
        access_token=body.get("access_token") if isinstance(body.get("access_token"), str) else None,
        extra_params=extra if isinstance(extra, dict) else {},
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None or isinstance(value, (dict, list)) else str(value)


class EventWorker:
    """One thread that handles webhook events in order, so a request never waits for the work."""

    def __init__(self, backend: Backend, maxsize: int = 1000):
        self.backend = backend
        self.events: queue.Queue[tuple[str, dict]] = queue.Queue(maxsize=maxsize)
        self.thread = threading.Thread(target=self._run, name=f"{backend.name}-events", daemon=True)
        self.thread.start()

    def submit(self, event: str, payload: dict) -> bool:
        try:
            self.events.put_nowait((event, payload))
            return True
        except queue.Full:
            log.warning("event queue full; dropped %s", event)
            return False

    def _run(self) -> None:
        while True:
            event, payload = self.events.get()
            try:
                self.backend.on_event(event, payload)
            except Exception:
                log.exception("handling %s failed", event)


def _check_auth(credentials: tuple[str, str] | None) -> bool:
    if credentials is None:
        return True
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).partition(b":")
    except ValueError:
        return False
    # bytes, not str: compare_digest refuses non-ASCII str (a TypeError, answered 500 instead of 401)
    return (hmac.compare_digest(user, credentials[0].encode())
            & hmac.compare_digest(password, credentials[1].encode()))


def create_app(backend: Backend, credentials: tuple[str, str] | None = None) -> Flask:
    """The WSGI app for one backend. ``credentials``: HTTP basic auth Label Studio must send (shared secret)."""
    app = Flask(backend.name)
    events = EventWorker(backend)
    backend.start()

    @app.before_request
    def _auth():
        if not _check_auth(credentials):
            return jsonify(error="missing or wrong credentials for this ML backend"), 401

    @app.errorhandler(BadRequest)
    def _bad_request(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(HTTPException)
    def _http_error(error):
        return jsonify(error=error.description), error.code

    @app.errorhandler(Exception)
    def _unexpected(error):
        log.exception("unexpected error in %s", request.path)
        return jsonify(error=f"internal error in {backend.name}: {type(error).__name__}"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class=backend.name, ready=backend.ready,
                       model_version=backend.model_version, **backend.status())

    @app.post("/setup")
    def setup():
        backend.setup(parse_setup(_json_body()))
        return jsonify(model_version=backend.model_version)

    @app.post("/predict")
    def predict():
        req = parse_predict(_json_body())
        results = backend.predict(req) if req.tasks else []
        if results and len(results) != len(req.tasks):
            raise RuntimeError(f"{backend.name} returned {len(results)} results for {len(req.tasks)} tasks")
        return jsonify(results=results, model_version=backend.model_version)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("'action' must name the event, e.g. ANNOTATION_CREATED")
        queued = events.submit(action, body)
        return jsonify(status="ok" if queued else "busy", action=action), 201 if queued else 503

    @app.get("/versions")
    def versions():
        return jsonify(versions=backend.versions())

    return app
