"""gunicorn hooks for Label Studio (its own venv loads this file: --config <path>).

The app is loaded once in the master (--preload) and the workers fork from it: one Django start-up instead of one
per worker, on a small CPU the longest step of a fresh start. Label Studio touches its database while it loads, so
the master closes those connections before forking: a SQLite or PostgreSQL connection must never be shared."""


def pre_fork(server, worker):
    from django.db import connections

    connections.close_all()
