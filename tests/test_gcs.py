"""Google Cloud Storage against a real emulator (fake-gcs-server) and a local OAuth token endpoint.

This module starts its own appliance (the GCS env must not leak into the shared one): source bucket synced into
tasks, manifest import, annotations exported to the target bucket, gs:// images fetched by both backends through
Label Studio's presign endpoint, and one-line errors within seconds for a wrong key, bucket or endpoint.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud import storage
from PIL import Image
from skimage import data as samples

from appliance import gcs
from appliance.models.sam.masks import mask_to_brush_rle
from appliance.settings import ConfigError, load_settings
from harness import ROOT, Appliance, appliance_env, free_port, gcs_emulator

SOURCE, TARGET = "appliance-src", "appliance-out"
NAMES = {"astronaut": samples.astronaut, "coffee": samples.coffee, "chelsea": samples.chelsea}
FACE = (225, 130)  # a point on the astronaut's face (512 x 512)


# --- the fakes: an OAuth token endpoint and the GCS emulator --------------------------------------
class TokenHandler(BaseHTTPRequestHandler):
    """Google's token endpoint, reduced: any key is good unless its client_email says it was revoked."""

    def do_POST(self):
        body = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        claims = body.get("assertion", ["x.e30.x"])[0].split(".")[1]
        issuer = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("iss", "")
        ok = "revoked" not in issuer
        answer = {"access_token": "x", "expires_in": 3600, "token_type": "Bearer"} if ok else \
            {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        payload = json.dumps(answer).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def service_account_key(token_uri: str, email: str = "labeler@appliance-test.iam.gserviceaccount.com") -> str:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "project_id": "appliance-test", "private_key_id": "k1",
                       "private_key": pem, "client_email": email, "client_id": "1", "token_uri": token_uri})


def jpeg(name: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(NAMES[name]()).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def token_uri():
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/token"
    server.shutdown()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), (SOURCE, TARGET)) as (url, client):
        for name in NAMES:
            client.bucket(SOURCE).blob(f"images/{name}.jpg").upload_from_string(jpeg(name), content_type="image/jpeg")
        client.bucket(SOURCE).blob("images/notes.txt").upload_from_string(b"not an image")  # the filter skips it
        yield url, client


@pytest.fixture(scope="module")
def key(token_uri) -> str:
    return service_account_key(token_uri)


@pytest.fixture(scope="module")
def gcs_env(emulator, key) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": emulator[0], "APPLIANCE_GCS_SOURCE_BUCKET": SOURCE,
            "APPLIANCE_GCS_SOURCE_PREFIX": "images", "APPLIANCE_GCS_TARGET_BUCKET": TARGET,
            "APPLIANCE_GCS_TARGET_PREFIX": "annotations", "APPLIANCE_GCS_CREDENTIALS_JSON": key,
            "APPLIANCE_METADATA_FIELDS": "site,captured", "APPLIANCE_SAMPLE_IMAGES": "false"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, artifacts, gcs_env):
    env = appliance_env(tmp_path_factory.mktemp("gcs-volume") / "data", **gcs_env)
    appliance = Appliance(env=env, log_path=artifacts / "appliance-gcs.log")
    appliance.log_path.write_text("")
    appliance.start()
    yield appliance
    if appliance.proc and appliance.proc.poll() is None:
        appliance.stop()


# --- helpers --------------------------------------------------------------------------------------
def tasks(app) -> list[dict]:
    pid = app.state()["project_id"]
    return app.api("GET", f"/api/tasks?project={pid}&page_size=1000&fields=task_only&resolve_uri=false").json()["tasks"]


def task_for(app, uri: str) -> dict:
    return next(t for t in tasks(app) if t["data"].get("image") == uri)


def cli(app, *args: str, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "appliance", *args], env={**app.env, **env}, capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    return proc, time.monotonic() - began


def settings_of(app, **env: str):
    from appliance.secrets import ensure_secrets

    settings = load_settings({**app.env, **env})
    ensure_secrets(settings)
    return settings


# --- the appliance on GCS -------------------------------------------------------------------------
def test_bootstrap_imports_the_source_bucket(app):
    images = sorted(t["data"]["image"] for t in tasks(app))
    assert images == sorted(f"gs://{SOURCE}/images/{n}.jpg" for n in NAMES)
    state = app.state()
    assert state["gcs_import_storage_id"] and state["gcs_export_storage_id"]
    storage_ = app.api("GET", f"/api/storages/gcs/{state['gcs_import_storage_id']}").json()
    assert storage_["presign"] is True and storage_["presign_ttl"] == 60 and storage_["use_blob_urls"] is True
    assert "google_application_credentials" not in storage_


def test_sync_twice_and_restarted_bootstrap_add_no_duplicates(app, emulator):
    storage_id = app.state()["gcs_import_storage_id"]
    for _ in range(2):
        assert app.api("POST", f"/api/storages/gcs/{storage_id}/sync").status_code == 200
    proc, _ = cli(app, "bootstrap")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert proc.stdout.count("is up to date") >= 3 and "updated GCS" not in proc.stdout, proc.stdout[-2000:]
    pid = app.state()["project_id"]
    assert len(app.api("GET", f"/api/storages/gcs?project={pid}").json()) == 1
    assert len(app.api("GET", f"/api/storages/export/gcs?project={pid}").json()) == 1
    assert len(tasks(app)) == len(NAMES)
    emulator[1].bucket(SOURCE).blob("images/new/extra.png").upload_from_string(jpeg("coffee"))
    app.api("POST", f"/api/storages/gcs/{storage_id}/sync")
    deadline = time.time() + 30
    while len(tasks(app)) == len(NAMES) and time.time() < deadline:
        time.sleep(0.5)
    assert sorted(t["data"]["image"] for t in tasks(app)).count(f"gs://{SOURCE}/images/new/extra.png") == 1
    assert len(tasks(app)) == len(NAMES) + 1


def test_manifest_import_creates_tasks_with_metadata_once(app, emulator, tmp_path):
    client = emulator[1]
    for name in ("astronaut", "chelsea"):
        client.bucket(SOURCE).blob(f"batch1/{name}.jpg").upload_from_string(jpeg(name), content_type="image/jpeg")
    manifest = tmp_path / "batch1.csv"
    with manifest.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["image_uri", "site", "captured"])
        writer.writerow([f"gs://{SOURCE}/batch1/astronaut.jpg", "orbit", "1984-02-07"])
        writer.writerow([f"gs://{SOURCE}/batch1/chelsea.jpg", "home", "2010-05-01"])
        writer.writerow([f"gs://{SOURCE}/images/coffee.jpg", "cafe", "2011-01-01"])  # synced already
    before = len(tasks(app))
    proc, _ = cli(app, "import", "--manifest", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert "2 task(s) created from 3 manifest row(s)" in proc.stdout and "1 already" in proc.stdout
    created = task_for(app, f"gs://{SOURCE}/batch1/astronaut.jpg")["data"]
    assert created == {"image": f"gs://{SOURCE}/batch1/astronaut.jpg", "site": "orbit", "captured": "1984-02-07"}
    assert len(tasks(app)) == before + 2
    proc, _ = cli(app, "import", "--manifest", str(manifest))  # a re-run creates nothing
    assert proc.returncode == 0 and "0 task(s) created" in proc.stdout, proc.stdout + proc.stderr
    # A JSON manifest read from the bucket itself; one image is new.
    client.bucket(SOURCE).blob("batch2/coffee.jpg").upload_from_string(jpeg("coffee"), content_type="image/jpeg")
    rows = [{"image": f"gs://{SOURCE}/batch2/coffee.jpg", "site": "lab", "captured": "2024-01-01", "score": 3},
            {"image": f"gs://{SOURCE}/batch1/chelsea.jpg", "site": "home"}]
    client.bucket(SOURCE).blob("manifests/batch2.json").upload_from_string(json.dumps(rows))
    proc, _ = cli(app, "import", "--manifest", f"gs://{SOURCE}/manifests/batch2.json")
    assert proc.returncode == 0 and "1 task(s) created from 2" in proc.stdout, proc.stdout + proc.stderr
    assert task_for(app, f"gs://{SOURCE}/batch2/coffee.jpg")["data"]["score"] == 3
    assert len(tasks(app)) == before + 3
    assert app.state()["manifest"]["source"] == f"gs://{SOURCE}/manifests/batch2.json"
    config = app.api("GET", f"/api/projects/{app.state()['project_id']}").json()["label_config"]
    assert '<Header value="$site"' in config and '<Header value="$captured"' in config


def test_a_bad_manifest_is_one_line(app, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,site\nx.jpg,a\n")
    proc, _ = cli(app, "import", "--manifest", str(bad))
    assert proc.returncode == 1 and "'image'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_submitted_annotation_lands_in_the_target_bucket(app, emulator):
    task = task_for(app, f"gs://{SOURCE}/images/chelsea.jpg")
    region = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 451,
              "original_height": 300, "value": {"x": 10, "y": 10, "width": 30, "height": 40, "rotation": 0,
                                                "rectanglelabels": ["Animal"]}}
    response = app.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [region]})
    assert response.status_code == 201, response.text
    annotation_id = response.json()["id"]
    bucket = emulator[1].bucket(TARGET)
    deadline, found = time.time() + 30, None
    while found is None and time.time() < deadline:
        for blob in bucket.list_blobs(prefix="annotations/"):
            body = json.loads(blob.download_as_bytes())
            annotations = body.get("annotations") or [body]
            if any(a.get("id") == annotation_id for a in annotations):
                found = next(a for a in annotations if a.get("id") == annotation_id)
        time.sleep(0.5)
    assert found is not None, [b.name for b in bucket.list_blobs()]
    assert found["result"][0]["value"]["rectanglelabels"] == ["Animal"]


def test_a_versions_dataset_lands_in_the_target_bucket_whole_or_not_at_all(app, emulator, tmp_path, monkeypatch):
    """What the trainer does after publishing (export.run.publish_dataset): the version's COCO sets under
    gs://<target>/<prefix>/datasets/vNNNN/, manifest last. An upload cut off halfway leaves no manifest (readers
    see no dataset); the next try completes it, and its masks are those annotated."""
    from pycocotools import mask as mask_utils

    from appliance.labelstudio.images import ImageFetcher
    from appliance.export.run import publish_dataset
    from appliance.models.registry import ModelRegistry
    from appliance.trainer.build import Datasets, keep_snapshot
    from appliance.trainer.dataset import build_dataset
    from random_model import random_model

    task = task_for(app, f"gs://{SOURCE}/images/astronaut.jpg")
    mask = np.zeros((512, 512), dtype=bool)
    mask[100:300, 150:350] = True
    mask[180:220, 230:270] = False  # a hole
    region = {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 512,
              "original_height": 512, "value": {"format": "rle", "rle": mask_to_brush_rle(mask),
                                                "brushlabels": ["Person"]}}
    assert app.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [region]}).status_code == 201
    settings = settings_of(app)
    snapshot = [app.api("GET", f"/api/tasks/{task['id']}?resolve_uri=false").json()]  # gs://, as the journal
    common = dict(labels=["Person", "Animal"], fetch=ImageFetcher.from_settings(settings).fetch, holdout_percent=0,
                  image_cache=tmp_path / "cache", holdout_ids=set())
    train = build_dataset(snapshot, out_dir=tmp_path / "train", split="train", **common)
    holdout = build_dataset(snapshot, out_dir=tmp_path / "holdout", split="holdout", **common)
    assert train.images == 1, train.skipped
    model = ModelRegistry(tmp_path / "scratch").path(random_model(tmp_path / "scratch", ["Person"]))
    keep_snapshot(Datasets(tmp_path / "train", tmp_path / "holdout", ["Person", "Animal"], train, holdout), model)
    version = ModelRegistry(settings.models_dir).publish(model, {}, make_current=False)

    uploads = []
    real_upload = storage.Blob.upload_from_filename

    def cut_off(blob, *args, **kwargs):
        if len(uploads) == 1:
            raise requests.ConnectionError("connection reset (the machine went away)")
        uploads.append(blob.name)
        return real_upload(blob, *args, **kwargs)

    monkeypatch.setattr(storage.Blob, "upload_from_filename", cut_off)
    with pytest.raises(gcs.GcsError, match="cannot write"):
        publish_dataset(settings, version)
    folder = f"annotations/datasets/{version}/"
    names = {b.name for b in emulator[1].bucket(TARGET).list_blobs(prefix=folder)}
    assert names == {folder + "holdout.json"}  # half there, and says so: no manifest
    monkeypatch.setattr(storage.Blob, "upload_from_filename", real_upload)

    assert publish_dataset(settings, version) == f"gs://{TARGET}/{folder.rstrip('/')}"
    bucket = emulator[1].bucket(TARGET)
    manifest = json.loads(bucket.blob(folder + "manifest.json").download_as_bytes())
    assert manifest["files"] == ["holdout.json", "train.json"] and manifest["version"] == version
    assert {b.name for b in bucket.list_blobs(prefix=folder)} == {folder + f for f in manifest["files"]} | {
        folder + "manifest.json"}
    coco = json.loads(bucket.blob(folder + "train.json").download_as_bytes())
    assert [i["id"] for i in coco["images"]] == [task["id"]]
    exported = mask_utils.decode(coco["annotations"][0]["segmentation"]).astype(bool)
    assert (exported == mask).all() and coco["categories"][0]["name"] == "Person"


# --- both backends resolve gs:// through Label Studio's presign endpoint --------------------------
def test_presign_endpoint_redirects_to_a_signed_emulator_url(app, emulator):
    task = task_for(app, f"gs://{SOURCE}/images/coffee.jpg")
    fileuri = base64.urlsafe_b64encode(f"gs://{SOURCE}/images/coffee.jpg".encode()).decode()
    response = app.api("GET", f"/tasks/{task['id']}/presign/?fileuri={fileuri}", allow_redirects=False)
    assert response.status_code in (302, 303), response.text[:300]
    location = response.headers["Location"]
    assert location.startswith(emulator[0]) and "X-Goog-Signature=" in location
    assert requests.get(location, timeout=10).content == jpeg("coffee")


def test_image_fetcher_and_prediction_backend_fetch_gs_images(app):
    from appliance.labelstudio import labeling
    from appliance.labelstudio.images import ImageError, ImageFetcher, decode_image
    from appliance.backends.predict import PredictBackend

    uri = f"gs://{SOURCE}/images/chelsea.jpg"
    task = task_for(app, uri)
    # The signed URL points at the emulator: a storage host, admitted after a presign (as from_settings does).
    fetcher = ImageFetcher(app.url, app.token, [], 10 * 1024 * 1024,
                           storage_hosts=[urlsplit(app.env["STORAGE_EMULATOR_HOST"]).netloc])
    with pytest.raises(ImageError, match="not Label Studio"):  # without it, the presign's redirect is refused
        ImageFetcher(app.url, app.token, [], 10 * 1024 * 1024, retries=0).fetch(uri, task["id"])
    assert fetcher.fetch(uri, task["id"]) == jpeg("chelsea")
    backend = PredictBackend(settings_of(app))  # the prediction backend's own fetch-and-decode path
    spec = labeling.parse(app.api("GET", f"/api/projects/{app.state()['project_id']}").json()["label_config"])
    images, _keys, errors = backend._images([task], spec)
    assert not errors and images[0].shape == decode_image(jpeg("chelsea"), 10**8).shape == (300, 451, 3)


def test_sam_click_on_a_gs_task_returns_a_mask(app):
    from test_sam_service import decode, interactive, keypoint

    app.wait_backend_ready("sam")
    task = task_for(app, f"gs://{SOURCE}/images/astronaut.jpg")
    response = interactive(app, task["id"], [keypoint(*FACE)])
    assert response.status_code == 200, response.text
    region = response.json()["data"]["result"][0]
    assert region["type"] == "brushlabels"
    assert decode(region)[FACE[1], FACE[0]]
    # The click makes the prefetcher warm the next unlabeled tasks: gs:// ones too, through the presign endpoint.
    health = f"{app.backend_url('sam')}/health"
    auth = app.backend_auth
    deadline = time.time() + 90
    while requests.get(health, auth=auth, timeout=5).json()["cache"]["entries"] < 2 and time.time() < deadline:
        time.sleep(1)
    assert requests.get(health, auth=auth, timeout=5).json()["cache"]["entries"] >= 2
    assert "prefetch skipped" not in app.log_text()


def test_cors_command_sets_the_rule_on_both_buckets(app, monkeypatch):
    proc, _ = cli(app, "gcs", "cors")
    assert proc.returncode == 0 and f"{SOURCE}, {TARGET}" in proc.stdout, proc.stdout + proc.stderr
    # fake-gcs-server accepts but does not keep CORS: check what is sent instead.
    sent, original = [], storage.Bucket.patch

    def spy(bucket, *args, **kwargs):
        sent.append((bucket.name, {k: bucket._properties[k] for k in bucket._changes}))
        return original(bucket, *args, **kwargs)

    monkeypatch.setattr(storage.Bucket, "patch", spy)
    assert gcs.configure_cors(settings_of(app)) == [SOURCE, TARGET]
    rule = {"origin": ["*"], "method": ["GET"], "responseHeader": ["Content-Type", "Access-Control-Allow-Origin"],
            "maxAgeSeconds": 3600}
    assert sent == [(SOURCE, {"cors": [rule]}), (TARGET, {"cors": [rule]})]


# --- one-line errors within seconds ---------------------------------------------------------------
def test_wrong_bucket_stops_the_bootstrap_with_one_line(app):
    proc, seconds = cli(app, "bootstrap", APPLIANCE_GCS_SOURCE_BUCKET="no-such-bucket")
    failures = [line for line in proc.stdout.splitlines() if "bootstrap failed" in line]
    assert proc.returncode == 2 and len(failures) == 1, proc.stdout[-2000:]  # 2: not restarted by supervisord
    assert "'no-such-bucket' does not exist" in failures[0] and "APPLIANCE_GCS_SOURCE_BUCKET" in failures[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 90, seconds  # not the ~111 s hang of an unreachable token endpoint


@pytest.mark.parametrize("case", ["revoked key", "silent token endpoint", "no emulator", "empty prefix"])
def test_preflight_fails_fast_with_one_line_naming_the_variable(app, token_uri, case, request):
    env = dict(app.env)
    if case == "revoked key":
        env["APPLIANCE_GCS_CREDENTIALS_JSON"] = service_account_key(token_uri, "revoked@appliance-test.iam.x")
        expected = ("refused", "APPLIANCE_GCS_CREDENTIALS_JSON")
    elif case == "silent token endpoint":  # connects, never answers: what a real token_uri does offline
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        request.addfinalizer(silent.close)
        key = service_account_key(f"http://127.0.0.1:{silent.getsockname()[1]}/token")
        env.pop("APPLIANCE_GCS_CREDENTIALS_JSON")
        env["GOOGLE_APPLICATION_CREDENTIALS_BASE64"] = base64.b64encode(key.encode()).decode()
        expected = ("token", "GOOGLE_APPLICATION_CREDENTIALS_BASE64")
    elif case == "no emulator":
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{free_port()}"
        expected = ("cannot reach GCS", "STORAGE_EMULATOR_HOST")
    else:
        env["APPLIANCE_GCS_SOURCE_PREFIX"] = "nothing-here"
        expected = ("no object under", "APPLIANCE_GCS_SOURCE_PREFIX")
    began = time.monotonic()
    with pytest.raises(gcs.GcsError) as caught:
        gcs.preflight(load_settings(env))
    seconds = time.monotonic() - began
    line = str(caught.value)
    assert all(word in line for word in expected) and "\n" not in line, line
    assert "PRIVATE KEY" not in line
    assert seconds < gcs.DEADLINE + 1, seconds


@pytest.mark.parametrize("name,value", [
    ("APPLIANCE_GCS_CREDENTIALS_JSON", '{"type": "service_account", "private_key": "SECRET-PART"'),
    ("APPLIANCE_GCS_CREDENTIALS_JSON", '{"type": "authorized_user", "refresh_token": "SECRET-PART"}'),
    ("GOOGLE_APPLICATION_CREDENTIALS_BASE64", "SECRET-PART!"),
    ("GOOGLE_APPLICATION_CREDENTIALS_BASE64", base64.b64encode(b'{"SECRET-PART": 1}').decode()),
    ("APPLIANCE_GCS_SOURCE_BUCKET", "gs://bucket/folder"), ("APPLIANCE_GCS_TARGET_BUCKET", "Upper"),
    ("APPLIANCE_GCS_TARGET_BUCKET", "ab"), ("APPLIANCE_GCS_SOURCE_BUCKET", "x" * 64),
    ("APPLIANCE_GCS_SOURCE_BUCKET", "goog-images"), ("APPLIANCE_GCS_SOURCE_FILTER", "*.jpg"),
    ("APPLIANCE_GCS_PRESIGN", "sometimes"), ("APPLIANCE_GCS_PRESIGN_TTL_MINUTES", "0"),
    ("STORAGE_EMULATOR_HOST", "localhost:4443"),
])
def test_bad_gcs_setting_is_one_line_without_the_secret(name, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    line = caught.value.line
    assert name in line and "\n" not in line and "SECRET-PART" not in line


def test_missing_key_file_is_named_only_when_gcs_is_on(tmp_path):
    assert load_settings({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json")}).gcs_enabled is False
    with pytest.raises(ConfigError) as caught:
        load_settings({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json"),
                       "APPLIANCE_GCS_SOURCE_BUCKET": "images-bucket"})
    assert "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.line


def test_key_never_logged(app, key):
    secret = json.loads(key)["private_key"].splitlines()[5]
    assert secret not in app.log_text()
