"""The appliance started by its real entrypoint against the real Label Studio: bootstrap, auth, idempotence."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time

import requests

from harness import ROOT, login


def test_login_with_generated_credentials(appliance):
    secrets = appliance.secrets()
    session = login(appliance.url, "admin@appliance.local", secrets["LABEL_STUDIO_PASSWORD"])
    me = session.get(f"{appliance.url}/api/current-user/whoami", timeout=30)
    assert me.status_code == 200 and me.json()["email"] == "admin@appliance.local"
    wrong = login(appliance.url, "admin@appliance.local", "not-the-password")
    assert wrong.get(f"{appliance.url}/api/current-user/whoami", timeout=30).status_code == 401


def test_api_token_works_and_a_wrong_one_does_not(appliance):
    assert len(appliance.token) <= 40
    assert appliance.api("GET", "/api/current-user/whoami").status_code == 200
    bad = requests.get(f"{appliance.url}/api/projects", headers={"Authorization": "Token wrong"}, timeout=30)
    assert bad.status_code == 401


def test_project_has_template_and_settings(appliance):
    project = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()
    assert project["title"] == "Segmentation"
    config = project["label_config"]
    assert '<BrushLabels name="mask" toName="image" smart="false"' in config  # no smart brush among the prompts
    # The prompts: smart-only (the smart tool is the only keypoint and box tool), beside the image.
    assert re.search(r'<KeyPointLabels name="point" toName="image" smart="true" smartOnly="true"', config)
    assert re.search(r'<RectangleLabels name="box" toName="image" smart="true" smartOnly="true"', config)
    assert 'style="display: flex' in config
    hotkeys = re.findall(r'hotkey="([^"]+)"', config)
    assert len(hotkeys) == len(set(hotkeys)) == 12  # one key per label and tool: 1-4, shift+1-4, alt+1-4
    for label in ("Person", "Animal", "Vehicle", "Object"):
        assert f'value="{label}"' in config
    assert project["evaluate_predictions_automatically"] is True


def test_sample_images_imported_and_served(appliance):
    project_id = appliance.state()["project_id"]
    tasks = appliance.api("GET", f"/api/tasks?project={project_id}&page_size=100").json()["tasks"]
    assert len(tasks) == 5
    image_url = next(iter(tasks[0]["data"].values()))
    assert "/data/local-files/?d=" in image_url
    image = appliance.api("GET", image_url[image_url.index("/data/"):])
    assert image.status_code == 200 and image.headers["Content-Type"].startswith("image/")


def test_both_ml_backends_connected(appliance):
    project_id = appliance.state()["project_id"]
    backends = appliance.api("GET", f"/api/ml?project={project_id}").json()
    assert sorted(b["url"] for b in backends) == sorted(
        [appliance.backend_url('sam'),
         appliance.backend_url('predict')])
    assert all(b["state"] == "CO" for b in backends), backends
    assert [b["is_interactive"] for b in backends if "SAM" in b["title"]] == [True]


def test_backends_refuse_requests_without_the_shared_secret(appliance):
    url = appliance.backend_url('sam')
    assert requests.get(f"{url}/health", timeout=5).status_code == 401
    auth = appliance.backend_auth
    assert requests.get(f"{url}/health", timeout=5, auth=auth).json()["status"] == "UP"


def test_open_signup_is_refused(appliance):
    session = requests.Session()
    page = session.get(f"{appliance.url}/user/signup/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = session.post(f"{appliance.url}/user/signup/", timeout=30,
                            data={"csrfmiddlewaretoken": csrf, "email": "intruder@example.com",
                                  "password": "intruder-password-1", "how_find_us": "x"},
                            headers={"Referer": f"{appliance.url}/user/signup/"})
    assert response.status_code == 403
    assert login(appliance.url, "intruder@example.com", "intruder-password-1").get(
        f"{appliance.url}/api/current-user/whoami", timeout=30).status_code == 401


def test_status_reports_processes_project_and_connections(appliance):
    sam = f"{appliance.backend_url('sam')}/health"
    auth = appliance.backend_auth
    deadline = time.time() + 240
    while not requests.get(sam, auth=auth, timeout=10).json().get("ready"):  # the SAM model is loaded
        assert time.time() < deadline, "SAM never became ready"
        time.sleep(1)
    out = subprocess.run([sys.executable, "-m", "appliance", "status", "--json"], env=appliance.env,
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    report = json.loads(out.stdout)
    states = {p["name"]: p["state"] for p in report["processes"]}
    assert states["studio"] == states["sam"] == states["predict"] == states["train"] == "RUNNING"
    assert states["bootstrap"] == "EXITED"
    assert report["project"]["tasks"] == 5
    assert {m["state"] for m in report["project"]["ml_backends"]} == {"CO"}
    assert report["serving_model"]["model_version"]
    import torch  # the device each model uses, and why a GPU is not used when it is not

    devices = report["devices"]
    assert devices["setting"] == "auto" and devices["cuda_build"] == torch.version.cuda
    assert devices["sam"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices["usable"] or devices["why"]
    text = subprocess.run([sys.executable, "-m", "appliance", "status"], env=appliance.env, capture_output=True,
                          text=True, cwd=ROOT, timeout=60).stdout
    assert f"APPLIANCE_DEVICE=auto: {devices['device']}" in text and "SAM model on " in text


def test_secrets_file_is_private_and_never_logged(appliance):
    path = appliance.data_dir / "secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log = appliance.log_text()
    assert "studio   |" in log and "bootstrap|" in log  # every line carries its program's name
    for name, value in appliance.secrets().items():
        assert value not in log, f"{name} appears in the log"


def counts(appliance) -> dict[str, int]:
    pid = appliance.state()["project_id"]
    return {
        "projects": len(appliance.api("GET", "/api/projects").json()["results"]),
        "tasks": len(appliance.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]),
        "storages": len(appliance.api("GET", f"/api/storages/localfiles?project={pid}").json()),
        "ml": len(appliance.api("GET", f"/api/ml?project={pid}").json()),
        "webhooks": len(appliance.api("GET", f"/api/webhooks?project={pid}").json()),
    }


def test_restart_stops_gracefully_duplicates_nothing_and_reconnects_a_backend_on_a_new_port(appliance):
    from harness import free_port

    before = counts(appliance)
    secrets = appliance.secrets()
    assert appliance.stop() == 0
    appliance.env["APPLIANCE_SAM_PORT"] = str(free_port())
    appliance.start()
    assert counts(appliance) == before
    assert appliance.secrets() == secrets
    for value in secrets.values():
        assert value not in appliance.log_text()
    backends = appliance.api("GET", f"/api/ml?project={appliance.state()['project_id']}").json()
    sam = next(b for b in backends if "SAM" in b["title"])
    assert sam["url"] == appliance.backend_url('sam') and sam["state"] == "CO"
