"""Annotator accounts: APPLIANCE_ANNOTATORS (set on the session appliance, conftest.py) creates them once, their
passwords kept in secrets.env and never logged; `appliance users add` prints a new account's password once and
refuses a malformed e-mail in one line; an annotator logs in, sees the project and submits."""

from __future__ import annotations

import stat
import subprocess
import sys

from appliance import entrypoint
from appliance.accounts import SECRET_PREFIX
from appliance.secrets import ensure_secrets, read_secrets_file
from appliance.settings import load_settings
from harness import ROOT, Appliance, login


def scratch_task(app: Appliance) -> int:
    """A task in a project of its own: what annotators submit here must not reach the appliance project's journal
    (its trainer counts annotations, and the trainer tests count on that)."""
    project = app.api("POST", "/api/projects", json={"title": "accounts test",
                                                     "label_config": '<View><Image name="image" value="$image"/>'
                                                                     '<Choices name="c" toName="image">'
                                                                     '<Choice value="ok"/></Choices></View>'})
    project.raise_for_status()
    made = app.api("POST", f"/api/projects/{project.json()['id']}/import?return_task_ids=true",
                   json=[{"image": "/static/none.png"}])
    made.raise_for_status()
    return made.json()["task_ids"][0]


def submit_as(app: Appliance, email: str, password: str, task_id: int) -> int:
    """Log in through the form as a browser does, find the project, submit an annotation; the HTTP status."""
    session = login(app.url, email, password)
    assert session.get(f"{app.url}/api/current-user/whoami", timeout=30).json()["email"] == email
    projects = session.get(f"{app.url}/api/projects", timeout=30).json()["results"]
    assert app.state()["project_id"] in [p["id"] for p in projects]  # the appliance's project is theirs to label
    response = session.post(f"{app.url}/api/tasks/{task_id}/annotations",
                            json={"result": [{"from_name": "c", "to_name": "image", "type": "choices",
                                              "value": {"choices": ["ok"]}}], "was_cancelled": False},
                            headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": app.url}, timeout=30)
    return response.status_code


def test_annotators_from_the_environment_exist_once_and_can_submit(appliance):
    stored = read_secrets_file(appliance.data_dir / "secrets.env")
    assert stat.S_IMODE((appliance.data_dir / "secrets.env").stat().st_mode) == 0o600
    passwords = {k.removeprefix(SECRET_PREFIX): v for k, v in stored.items() if k.startswith(SECRET_PREFIX)}
    assert sorted(passwords) == ["ana@example.org", "bo@example.org"]  # e-mails are logins: lower case
    log = appliance.log_text()
    assert log.count("annotator accounts created: ana@example.org, bo@example.org") == 1
    assert not any(p in log for p in passwords.values())
    assert submit_as(appliance, "ana@example.org", passwords["ana@example.org"], scratch_task(appliance)) == 201

    settings = load_settings(appliance.env)
    ensure_secrets(settings)
    assert entrypoint.ensure_annotators(settings) == []  # a second start creates nothing, changes no password
    assert read_secrets_file(appliance.data_dir / "secrets.env") == stored
    listed = appliance.cli("users", "list").stdout
    assert "ana@example.org" in listed and "annotator" in listed and "admin@appliance.local" in listed
    assert "1 annotations" in listed.split("ana@example.org")[1].splitlines()[0]
    shown = appliance.cli("credentials").stdout
    assert f"annotator bo@example.org: password {passwords['bo@example.org']}" in shown


def test_users_add_prints_the_password_once_and_refuses_bad_input(appliance):
    bad = appliance.cli("users", "add", "not an e-mail")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "not an e-mail address" in lines[0], lines

    added = appliance.cli("users", "add", "Cy@Example.org", "--name", "Cy Young")
    assert added.returncode == 0, added.stderr
    password = added.stdout.split("password: ")[1].split()[0]
    assert submit_as(appliance, "cy@example.org", password, scratch_task(appliance)) == 201
    assert password not in appliance.log_text()
    assert password not in (appliance.data_dir / "secrets.env").read_text()  # printed once, kept nowhere

    again = appliance.cli("users", "add", "cy@example.org")
    assert again.returncode == 1 and "has an account already" in again.stderr
    assert login(appliance.url, "cy@example.org", password).get(
        f"{appliance.url}/api/current-user/whoami", timeout=30).status_code == 200  # unchanged


def test_a_malformed_annotator_list_stops_start_up_in_one_line(tmp_path):
    from harness import appliance_env

    env = appliance_env(tmp_path / "data", APPLIANCE_ANNOTATORS="ana@example.org,ana at example")
    done = subprocess.run([sys.executable, "-m", "appliance", "up"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "APPLIANCE_ANNOTATORS" in lines[0] and "'ana at example' is not an e-mail address" in lines[0]
    assert not (tmp_path / "data").exists()
