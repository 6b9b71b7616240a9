"""Prepare Label Studio's database. Runs with Label Studio's own Python (a separate venv), not the appliance's.

Reads one JSON object on stdin: {"admin": {"email", "password", "token"} | null}. Environment: Label Studio's
settings (data dir, database). Prints one JSON line with what it changed. Idempotent:
- migrates only when migrations are pending (a fresh volume starts from a template migrated at install time);
- SQLite runs in WAL mode so readers never block the writer;
- creates the admin and the organization on first boot (password and token from the appliance's secrets);
  later boots keep the password the admin may have changed, but converge the API token, because every other
  process authenticates with it;
- turns legacy API tokens on for the organization (the ML backend protocol still needs them).
"""

import json
import os
import sys
from pathlib import Path


def setup_django() -> None:
    import label_studio

    sys.path.insert(0, str(Path(label_studio.__file__).parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings.label_studio")
    import django

    django.setup()


def migrate() -> bool:
    from django.core.management import call_command
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.db.migrations.executor import MigrationExecutor

    connection = connections[DEFAULT_DB_ALIAS]
    connection.prepare_database()
    executor = MigrationExecutor(connection)
    if not executor.migration_plan(executor.loader.graph.leaf_nodes()):
        return False
    call_command("migrate", "--no-color", verbosity=0)
    return True


def wal_mode() -> str | None:
    from django.db import connection

    if connection.vendor != "sqlite":
        return None
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=wal;")
        return cursor.fetchone()[0]


def ensure_admin(email: str, password: str, token: str) -> dict:
    from organizations.models import Organization
    from rest_framework.authtoken.models import Token
    from users.models import User

    changed = {"user_created": False, "token_updated": False, "legacy_tokens_enabled": False}
    user = User.objects.filter(email=email).first()
    if user is None:
        user = User.objects.create_user(email=email, password=password, is_staff=True, is_superuser=True)
        changed["user_created"] = True
    org = Organization.objects.first()
    if org is None:
        org = Organization.create_organization(created_by=user, title="Label Studio")
    elif not org.has_user(user):
        org.add_user(user)
    if user.active_organization_id != org.id:
        user.active_organization = org
        user.save(update_fields=["active_organization"])
    current = Token.objects.filter(user=user).first()
    if current is None or current.key != token:
        Token.objects.filter(user=user).delete()
        Token.objects.create(user=user, key=token)
        changed["token_updated"] = not changed["user_created"]
    jwt = org.jwt
    if not jwt.legacy_api_tokens_enabled or not jwt.api_tokens_enabled:
        jwt.legacy_api_tokens_enabled = True
        jwt.api_tokens_enabled = True
        jwt.save()
        changed["legacy_tokens_enabled"] = True
    return changed


def main() -> None:
    params = json.load(sys.stdin)
    setup_django()
    result = {"migrated": migrate(), "journal_mode": wal_mode()}
    admin = params.get("admin")
    if admin:
        result.update(ensure_admin(admin["email"], admin["password"], admin["token"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
