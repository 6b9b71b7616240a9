"""Annotator accounts in Label Studio Community (sign-up stays closed): created by `appliance users add` or from
APPLIANCE_ANNOTATORS at start, listed by `appliance users list`.

Accounts are made in Label Studio's database by studio_scripts/users.py (Label Studio's own Python and models,
SQLite or PostgreSQL alike) and join the admin's organization, so they see the project at once. A password is
generated; `users add` prints it once, APPLIANCE_ANNOTATORS keeps it in secrets.env (0600, never logged) for
`appliance credentials`. An existing account is never changed: an annotator's own password stands.
"""

from __future__ import annotations

import os
import secrets as random

from appliance.settings import Settings, check_email

SECRET_PREFIX = "ANNOTATOR_PASSWORD_"


class AccountError(ValueError):
    """A refusal by Label Studio; one line."""


def new_password() -> str:
    return random.token_urlsafe(12)


def _script(settings: Settings, params: dict) -> dict:
    from appliance import studio

    return studio.run_script("users.py", {**os.environ, **studio.studio_env(settings)}, params)


def add(settings: Settings, email: str, name: str = "") -> str | None:
    """Create the account; its password, or None when the e-mail has an account already."""
    email = check_email(email)
    password = new_password()
    first, _, last = name.strip().partition(" ")
    result = _script(settings, {"action": "add", "users": [{"email": email, "password": password,
                                                            "first_name": first, "last_name": last}]})
    return password if email in result["created"] else None


def ensure(settings: Settings, emails: list[str], stored: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Create the missing accounts of ``emails``; returns (created e-mails, passwords to keep in secrets.env).
    A password kept from an earlier start is reused, so an account deleted by hand comes back as it was."""
    wanted = {e: stored.get(SECRET_PREFIX + e) or new_password() for e in emails}
    result = _script(settings, {"action": "add", "users": [{"email": e, "password": p} for e, p in wanted.items()]})
    keep = {SECRET_PREFIX + e: p for e, p in wanted.items() if e in result["created"] or SECRET_PREFIX + e in stored}
    return result["created"], keep


def listing(settings: Settings) -> list[dict]:
    return _script(settings, {"action": "list"})["users"]
