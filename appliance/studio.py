"""Everything about running Label Studio: its environment, its database, its gunicorn command line.

Label Studio lives in its own virtual environment (``<prefix>/studio`` beside the appliance's ``<prefix>/app``),
so this module talks to it through subprocesses only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from appliance.settings import Settings

SCRIPTS = Path(__file__).parent / "studio_scripts"

# Label Studio's own default SSRF block list (core/utils/io.py validate_ip). Its guard only knows subnets, so the
# exception for the ML backends is the smallest one possible: their exact addresses (/32 or /128), carved out of
# the subnet that holds them. The backends listen on a loopback address of their own (127.0.0.2), so Label Studio
# can reach them and nothing else on loopback: not its own port, not the GCS emulator, not any other local service.
DEFAULT_BANNED_SUBNETS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96",
    "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)


def banned_subnets(exempt: set[str]) -> list[str]:
    """The default list with each exempt address cut out of the subnets that contain it."""
    networks = [ipaddress.ip_network(n) for n in DEFAULT_BANNED_SUBNETS]
    for address in sorted(exempt):
        hole = ipaddress.ip_network(address)
        networks = [piece for net in networks
                    for piece in (net.address_exclude(hole) if net.version == hole.version and hole.subnet_of(net)
                                  else [net])]
    return [str(net) for net in networks]


def backend_addresses(settings: Settings) -> set[str]:
    """The IP addresses Label Studio connects to for the ML backends (names resolved once, at start)."""
    found = set()
    for url in (settings.sam_base_url, settings.predict_base_url):
        host = urlsplit(url).hostname or ""
        try:
            found.add(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        try:
            found.update(info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
        except OSError:
            pass  # not resolvable yet: the bootstrap's wait for the backend reports it
    return found


def install_prefix() -> Path:
    """The folder holding both venvs: the appliance runs from ``<prefix>/app``."""
    return Path(sys.prefix).parent


def studio_venv() -> Path:
    return install_prefix() / "studio"


def template_db() -> Path:
    return install_prefix() / "studio-template.sqlite3"


def studio_package_dir() -> Path:
    found = sorted(studio_venv().glob("lib/python3*/site-packages/label_studio"))
    if not found:
        raise FileNotFoundError(f"Label Studio is not installed in {studio_venv()}; run scripts/install.sh")
    return found[0]


def database_env(settings: Settings) -> dict[str, str]:
    if not settings.database_url:
        return {"DJANGO_DB": "sqlite", "DATABASE_NAME": str(settings.studio_dir / "label_studio.sqlite3")}
    url = urlsplit(settings.database_url)
    return {
        "DJANGO_DB": "default",
        "POSTGRE_NAME": url.path.lstrip("/"),
        "POSTGRE_USER": unquote(url.username or "postgres"),
        "POSTGRE_PASSWORD": unquote(url.password or ""),
        "POSTGRE_HOST": url.hostname or "localhost",
        "POSTGRE_PORT": str(url.port or 5432),
    }


def studio_env(settings: Settings) -> dict[str, str]:
    """Label Studio's configuration, derived from the appliance settings (one vocabulary for the user)."""
    return {
        "DJANGO_SETTINGS_MODULE": "core.settings.label_studio",
        "LABEL_STUDIO_BASE_DATA_DIR": str(settings.studio_dir),
        "SECRET_KEY": settings.secret("secret_key"),
        "LOG_LEVEL": settings.log_level,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "true",
        "LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS": "false",
        "LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS": ",".join(banned_subnets(backend_addresses(settings))),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(settings.files_root),
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_INTERNAL_PORT": str(settings.port),
        # Show the predictions of the version each connected ML backend serves now (the backend's model_version,
        # refreshed on every health/setup round), not the version pinned in the project when it was created.
        "ff_front_dev_1682_model_version_dropdown_070622_short": "true",
        # The annotation journal (a Local Files export storage) gets the whole task with its annotations per file,
        # so the trainer needs no export call to know a task's image.
        "fflag_feat_optic_650_target_storage_task_format_long": "true",
        **database_env(settings),
        **gcs_env(settings),
    }


def gcs_env(settings: Settings) -> dict[str, str]:
    """GCS storages: an emulator when one is set; the VM's service account signs URLs when no key is given."""
    env = {}
    if settings.storage_emulator_host:
        env["STORAGE_EMULATOR_HOST"] = settings.storage_emulator_host
        # Unsigned (presign=false) images are proxied by Label Studio from this URL.
        env["LABEL_STUDIO_RESOLVER_PROXY_GCS_DOWNLOAD_URL"] = (
            settings.storage_emulator_host + "/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media")
    elif settings.gcs_enabled and not settings.gcs_key_json:
        env["GCS_CLOUD_STORAGE_FORCE_DEFAULT_CREDENTIALS"] = "true"
    return env


def gunicorn_command(settings: Settings) -> list[str]:
    """gunicorn binds the one port or fails loudly: no silent hop to 8081 as ``label-studio start`` does."""
    return [
        str(studio_venv() / "bin" / "gunicorn"),
        "--chdir", str(studio_package_dir()),
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.studio_workers),
        "--threads", "4",
        "--timeout", "300",
        "--graceful-timeout", "20",
        "--forwarded-allow-ips", "127.0.0.1",
        "--no-control-socket",
        "--preload", "--config", str(SCRIPTS / "gunicorn_studio.py"),
        "core.wsgi:application",
    ]


def run_script(name: str, env: dict[str, str], params: dict) -> dict:
    """Run one of studio_scripts/ with Label Studio's Python and settings; returns its JSON answer."""
    proc = subprocess.run(
        [str(studio_venv() / "bin" / "python"), str(SCRIPTS / name)],
        input=json.dumps(params), env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"Label Studio {name.removesuffix('.py')} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_prepare(env: dict[str, str], admin: dict | None) -> dict:
    """Migrate if needed, switch SQLite to WAL, converge the admin user and token. Returns what changed."""
    return run_script("prepare_db.py", env, {"admin": admin})


def converge_file_storages(settings: Settings, project_id: int) -> dict:
    """The journal (outside the document root) and the move of an old volume's images storage; see storages.py."""
    # A shared journal (APPLIANCE_SHARED_STATE) is a GCS export storage instead: see gcs_bootstrap.
    journal = None if settings.shared_state else str(settings.journal_dir)
    params = {"project": project_id, "journal": journal, "images": str(settings.served_images),
              "legacy_images": str(settings.images)}
    return run_script("storages.py", {**os.environ, **studio_env(settings)}, params)


def prepare_database(settings: Settings, base_env: dict[str, str]) -> dict:
    """First boot on SQLite copies the template migrated at install time (seconds instead of a minute)."""
    settings.studio_dir.mkdir(parents=True, exist_ok=True)
    db = settings.studio_dir / "label_studio.sqlite3"
    copied = False
    if not settings.database_url and not db.exists() and template_db().exists():
        shutil.copyfile(template_db(), db)
        copied = True
    admin = {"email": settings.username, "password": settings.secret("password"), "token": settings.secret("api_key")}
    result = run_prepare({**base_env, **studio_env(settings)}, admin)
    return {"copied_template": copied, **result}


def build_template(output: Path, base_env: dict[str, str]) -> None:
    """Migrate an empty SQLite database once (install or image build time)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **base_env,
            "DJANGO_SETTINGS_MODULE": "core.settings.label_studio",
            "LABEL_STUDIO_BASE_DATA_DIR": tmp,
            "DJANGO_DB": "sqlite",
            "DATABASE_NAME": str(Path(tmp) / "template.sqlite3"),
            "SECRET_KEY": "template-build-only",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        }
        run_prepare(env, None)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "template.sqlite3", output)
