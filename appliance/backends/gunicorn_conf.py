"""gunicorn hooks for the model backends (loaded with --config python:appliance.backends.gunicorn_conf)."""

import os


def worker_exit(server, worker):
    # Requests are done by now. Skip interpreter teardown: torch's native thread pools can abort
    # ("terminate called without an active exception") while daemon threads still hold them.
    os._exit(0)
