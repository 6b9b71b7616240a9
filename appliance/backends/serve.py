"""Build a backend's WSGI app from the settings (used by the gunicorn factories of each backend)."""

from __future__ import annotations

from flask import Flask

from appliance import runtime
from appliance.backends.protocol import Backend, create_app
from appliance.settings import Settings


def build(make_backend) -> Flask:
    settings: Settings = runtime.load()
    runtime.setup_logging(settings)
    backend: Backend = make_backend(settings)
    return create_app(backend, credentials=settings.backend_credentials)
