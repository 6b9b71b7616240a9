"""Google Cloud Storage through google-cloud-storage: credentials, a bounded preflight, CORS, reading one object.

Every call here is bounded (per-request timeouts, short retry windows, and a hard deadline around the preflight),
so a wrong key, bucket or endpoint costs seconds, not the minutes a default client can hang. Errors are GcsError:
one line naming the problem and the variable to fix; a key's content never appears in them.
"""

from __future__ import annotations

import functools
import threading
from urllib.parse import urlsplit

import requests
from google.api_core import exceptions as api
from google.auth import compute_engine
from google.auth import exceptions as auth
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import Request
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from appliance.settings import Settings, service_account_info

TIMEOUT = (3.05, 5.0)  # connect, read: per HTTP request
RETRY = DEFAULT_RETRY.with_timeout(4.0)  # all retries of one call together
DEADLINE = 12.0  # the whole preflight
SCOPES = ["https://www.googleapis.com/auth/devstorage.full_control"]
METADATA_URL = "http://169.254.169.254/computeMetadata/v1/project/project-id"
KEY_VARS = "APPLIANCE_GCS_CREDENTIALS_JSON, GOOGLE_APPLICATION_CREDENTIALS_BASE64 or GOOGLE_APPLICATION_CREDENTIALS"
CORS_RULE = {"origin": ["*"], "method": ["GET"], "responseHeader": ["Content-Type", "Access-Control-Allow-Origin"],
             "maxAgeSeconds": 3600}


class GcsError(RuntimeError):
    """A GCS problem the user must fix: one line naming it and the variable to change."""


def key_variable(settings: Settings) -> str:
    """The variable the service-account key came from (what to fix when GCS refuses it)."""
    if settings.gcs_credentials_json is not None:
        return "APPLIANCE_GCS_CREDENTIALS_JSON"
    if settings.gcs_credentials_base64 is not None:
        return "GOOGLE_APPLICATION_CREDENTIALS_BASE64"
    if settings.gcs_credentials_file is not None:
        return "GOOGLE_APPLICATION_CREDENTIALS"
    return "the VM's service account (or set " + KEY_VARS + ")"


def credentials_info(settings: Settings) -> dict | None:
    """The service-account key as a dict, from the first variable holding one; None when none is set."""
    try:
        text = settings.gcs_key_json
    except OSError as error:
        raise GcsError(f"cannot read GOOGLE_APPLICATION_CREDENTIALS ({error.strerror}): fix the path") from None
    if text is None:
        return None
    try:
        return service_account_info(text)
    except ValueError as error:
        raise GcsError(f"{key_variable(settings)} {error}") from None


def on_gce(timeout: float = 1.0) -> bool:
    """True on a Google Compute Engine VM (its metadata server answers); a short timeout everywhere else."""
    try:
        response = requests.get(METADATA_URL, headers={"Metadata-Flavor": "Google"}, timeout=timeout)
    except requests.RequestException:
        return False
    return response.ok and response.headers.get("Metadata-Flavor") == "Google"


def endpoint(settings: Settings) -> str:
    return settings.storage_emulator_host or "https://storage.googleapis.com"


def client(settings: Settings) -> storage.Client:
    """A client on the configured key, else anonymous on an emulator, else the VM's service account."""
    info = credentials_info(settings)
    if info is not None:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    elif settings.storage_emulator_host:
        credentials = AnonymousCredentials()
    elif on_gce():
        credentials = compute_engine.Credentials()
    else:
        raise GcsError(f"no GCS credentials: set {KEY_VARS}, or run on a GCE VM with a service account")
    # An explicit project keeps the client from probing for a default one (which can hang off Google Cloud).
    project = settings.gcp_project or (info or {}).get("project_id") or "<none>"
    options = {"api_endpoint": settings.storage_emulator_host} if settings.storage_emulator_host else None
    return storage.Client(project=project, credentials=credentials, client_options=options)


def _check_credentials(settings: Settings, gcs: storage.Client) -> None:
    credentials = gcs._credentials
    if isinstance(credentials, AnonymousCredentials):
        return
    where = getattr(credentials, "_token_uri", None) or "the metadata server"
    try:
        credentials.refresh(functools.partial(Request(), timeout=TIMEOUT[1]))
    except auth.RefreshError as error:
        reason = str(error.args[0] if error.args else error).splitlines()[0][:160]
        raise GcsError(f"GCS credentials refused by {where} ({reason}): fix {key_variable(settings)}") from None
    except auth.TransportError as error:
        raise GcsError(f"cannot reach {where} to get a GCS token ({_short(error)}): check the network, or the "
                       f"key's token_uri in {key_variable(settings)}") from None


def _check_bucket(settings: Settings, gcs: storage.Client, name: str, variable: str, prefix: str = "") -> None:
    try:
        bucket = gcs.get_bucket(name, timeout=TIMEOUT, retry=RETRY)
        if prefix and not list(bucket.list_blobs(prefix=prefix, max_results=1, timeout=TIMEOUT, retry=RETRY)):
            raise GcsError(f"no object under gs://{name}/{prefix} (Label Studio refuses an empty folder): "
                           f"fix APPLIANCE_GCS_SOURCE_PREFIX")
    except api.NotFound:
        raise GcsError(f"GCS bucket {name!r} does not exist: fix {variable}") from None
    except (api.Forbidden, api.Unauthorized) as error:
        raise GcsError(f"GCS refused access to bucket {name!r} (HTTP {error.code}): grant {key_variable(settings)} "
                       f"the roles in the README's GCS section, or fix {variable}") from None
    except (api.GoogleAPICallError, api.RetryError, requests.RequestException, auth.TransportError) as error:
        raise GcsError(f"cannot reach GCS at {endpoint(settings)} for bucket {name!r} ({_short(error)}): "
                       f"check the network{' and STORAGE_EMULATOR_HOST' if settings.storage_emulator_host else ''}"
                       ) from None


def preflight(settings: Settings, deadline: float = DEADLINE) -> None:
    """Check credentials, buckets, permissions and endpoint within ``deadline`` seconds; raise GcsError if not."""
    def checks() -> None:
        gcs = client(settings)
        _check_credentials(settings, gcs)
        if settings.gcs_source_bucket:
            _check_bucket(settings, gcs, settings.gcs_source_bucket, "APPLIANCE_GCS_SOURCE_BUCKET",
                          settings.gcs_source_prefix)
        if settings.gcs_target_bucket:
            _check_bucket(settings, gcs, settings.gcs_target_bucket, "APPLIANCE_GCS_TARGET_BUCKET")
        if settings.shared_state:
            _check_bucket(settings, gcs, settings.shared_bucket, "APPLIANCE_SHARED_STATE")

    bounded(checks, deadline, settings)


def bounded(work, deadline: float, settings: Settings):
    """Run ``work()`` in a thread; GcsError if it has not finished within ``deadline`` seconds."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as error:  # handed to the caller's thread
            result["error"] = error

    thread = threading.Thread(target=run, name="gcs-preflight", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise GcsError(f"GCS did not answer within {deadline:g} s (endpoint {endpoint(settings)}): check the network, "
                       f"STORAGE_EMULATOR_HOST and the key's token_uri in {key_variable(settings)}")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def apply_cors(bucket: storage.Bucket) -> None:
    """Let browsers load the bucket's objects from the Label Studio page (signed URLs are cross-origin)."""
    bucket.cors = [CORS_RULE]
    bucket.patch(timeout=TIMEOUT, retry=RETRY)


def configure_cors(settings: Settings) -> list[str]:
    """Apply the CORS rule to the source and target buckets; returns their names."""
    names = [n for n in dict.fromkeys([settings.gcs_source_bucket, settings.gcs_target_bucket]) if n]
    if not names:
        raise GcsError("no bucket configured: set APPLIANCE_GCS_SOURCE_BUCKET and/or APPLIANCE_GCS_TARGET_BUCKET")

    def configure() -> list[str]:
        gcs = client(settings)
        _check_credentials(settings, gcs)
        for name in names:
            variable = "APPLIANCE_GCS_SOURCE_BUCKET" if name == settings.gcs_source_bucket \
                else "APPLIANCE_GCS_TARGET_BUCKET"
            _check_bucket(settings, gcs, name, variable)
            try:
                apply_cors(gcs.bucket(name))
            except (api.Forbidden, api.Unauthorized) as error:
                raise GcsError(f"GCS refused to set CORS on {name!r} (HTTP {error.code}): run it with a key that has "
                               f"roles/storage.admin on the bucket ({key_variable(settings)})") from None
        return names

    return bounded(configure, 2 * DEADLINE, settings)


def split_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "gs" or not parts.netloc or not parts.path.strip("/"):
        raise GcsError(f"{uri!r} is not a gs://bucket/object URI")
    return parts.netloc, parts.path.lstrip("/")


def read_object(settings: Settings, uri: str, deadline: float = 60.0) -> bytes:
    """The bytes of one object (a manifest), e.g. gs://bucket/manifests/batch1.csv."""
    bucket, name = split_uri(uri)

    def download() -> bytes:
        try:
            return client(settings).bucket(bucket).blob(name).download_as_bytes(timeout=TIMEOUT, retry=RETRY)
        except api.NotFound:
            raise GcsError(f"{uri} does not exist") from None
        except (api.Forbidden, api.Unauthorized) as error:
            raise GcsError(f"GCS refused to read {uri} (HTTP {error.code}): check {key_variable(settings)}") from None
        except (api.GoogleAPICallError, api.RetryError, requests.RequestException, auth.GoogleAuthError) as error:
            raise GcsError(f"cannot read {uri} from {endpoint(settings)} ({_short(error)})") from None

    return bounded(download, deadline, settings)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120]}" if text else type(error).__name__


def upload_folder(settings: Settings, folder, uri: str, last: str = "manifest.json") -> int:
    """Upload every file under ``folder`` to gs://bucket/prefix/, ``last`` after all others (a reader that finds
    it finds everything); returns the number of files. Nothing is deleted in the bucket."""
    from pathlib import Path

    parts = urlsplit(uri)
    if parts.scheme != "gs" or not parts.netloc:
        raise GcsError(f"{uri!r} is not a gs://bucket/prefix URI")
    prefix = parts.path.strip("/")
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last and p.parent == Path(folder))
    bucket = client(settings).bucket(parts.netloc)
    for path in files:
        name = "/".join(x for x in (prefix, path.relative_to(folder).as_posix()) if x)
        try:
            bucket.blob(name).upload_from_filename(str(path), timeout=60, retry=RETRY)
        except (api.Forbidden, api.Unauthorized) as error:
            raise GcsError(f"GCS refused to write gs://{parts.netloc}/{name} (HTTP {error.code}): check "
                           f"{key_variable(settings)}") from None
        except (api.GoogleAPICallError, api.RetryError, requests.RequestException, auth.GoogleAuthError) as error:
            raise GcsError(f"cannot write gs://{parts.netloc}/{name} to {endpoint(settings)} ({_short(error)})") \
                from None
    return len(files)
