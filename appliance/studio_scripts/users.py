"""Annotator accounts. Runs with Label Studio's own Python (a separate venv), not the appliance's.

Reads one JSON object on stdin:
    {"action": "add", "users": [{"email", "password", "first_name"?, "last_name"?}]}
        creates the accounts that do not exist, in the organization (the admin's), and prints
        {"created": [...], "existing": [...]}; an existing account is left as it is
    {"action": "list"}
        prints {"users": [{"email", "name", "admin", "active", "last_activity", "annotations"}]}
"""

import json
import sys

from prepare_db import setup_django


def add(users: list[dict]) -> dict:
    from organizations.models import Organization
    from users.models import User

    org = Organization.objects.order_by("id").first()
    if org is None:
        raise SystemExit("Label Studio has no organization yet: start the appliance once first")
    created, existing = [], []
    for spec in users:
        email = spec["email"].lower()
        if User.objects.filter(email__iexact=email).exists():
            existing.append(email)
            continue
        user = User.objects.create_user(email=email, password=spec["password"],
                                        first_name=spec.get("first_name", ""), last_name=spec.get("last_name", ""))
        org.add_user(user)
        user.active_organization = org
        user.save(update_fields=["active_organization"])
        created.append(email)
    return {"created": created, "existing": existing}


def listing() -> dict:
    from tasks.models import Annotation
    from users.models import User

    users = []
    for user in User.objects.order_by("id"):
        users.append({"email": user.email, "name": f"{user.first_name} {user.last_name}".strip(),
                      "admin": bool(user.is_superuser), "active": bool(user.is_active),
                      "last_activity": user.last_activity.isoformat() if user.last_activity else None,
                      "annotations": Annotation.objects.filter(completed_by=user, was_cancelled=False).count()})
    return {"users": users}


def main() -> None:
    params = json.load(sys.stdin)
    setup_django()
    print(json.dumps(add(params["users"]) if params["action"] == "add" else listing()))


if __name__ == "__main__":
    main()
