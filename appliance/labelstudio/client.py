"""Label Studio's API: the one client module. Bootstrap converges through the SDK (``sdk``); the other processes
(bulk predict, manifest import, SAM prefetch, trainer, status) make their few REST calls through ``Studio``.
Every call carries the appliance's API token, which goes nowhere but ``settings.studio_base_url``."""

from __future__ import annotations

import time
from typing import Any

import requests
from label_studio_sdk.client import LabelStudio

from appliance.settings import Settings


class StudioError(RuntimeError):
    """Label Studio answered with an error; the message names the call and the status."""


def sdk(settings: Settings, timeout: float = 30) -> LabelStudio:
    return LabelStudio(base_url=settings.studio_base_url, api_key=settings.secret("api_key"), timeout=timeout)


class Studio:
    """The REST calls the appliance makes besides the bootstrap's."""

    def __init__(self, settings: Settings, timeout: float = 300) -> None:
        self.base = settings.studio_base_url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # the token goes to Label Studio only, never through a proxy variable
        self.session.headers["Authorization"] = f"Token {settings.secret('api_key')}"

    def __repr__(self) -> str:  # no token in tracebacks
        return f"Studio({self.base!r})"

    def get(self, path: str, what: str, **kwargs) -> Any:
        return self._check(self.session.get(f"{self.base}{path}", timeout=kwargs.pop("timeout", self.timeout),
                                            **kwargs), what).json()

    def post(self, path: str, what: str, **kwargs) -> Any:
        return self._check(self.session.post(f"{self.base}{path}", timeout=kwargs.pop("timeout", self.timeout),
                                             **kwargs), what).json()

    def patch(self, path: str, what: str, **kwargs) -> Any:
        return self._check(self.session.patch(f"{self.base}{path}", timeout=kwargs.pop("timeout", self.timeout),
                                              **kwargs), what).json()

    def project(self, project_id: int, timeout: float | None = None) -> dict:
        return self.get(f"/api/projects/{project_id}", "reading the project", timeout=timeout or self.timeout)

    def label_config(self, project_id: int) -> str:
        return self.project(project_id)["label_config"]

    @staticmethod
    def _check(response: requests.Response, what: str) -> requests.Response:
        if response.status_code >= 400:
            raise StudioError(f"Label Studio answered HTTP {response.status_code} while {what}: "
                              f"{response.text[:200]}")
        return response


def wait_http(url: str, deadline: float, what: str, auth: tuple[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200, or raise TimeoutError naming ``what``."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=2, auth=auth)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as error:
            last = type(error).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not become ready at {url} ({last})")


def wait_sync(ls: LabelStudio, project_id: int, before: int, seconds: float = 30) -> int:
    """A storage sync may run in the background; wait until the project's task count settles."""
    deadline, count, stable = time.monotonic() + seconds, before, 0
    while time.monotonic() < deadline and stable < 3:
        time.sleep(0.3)
        new = ls.projects.get(project_id).task_number or 0
        stable = stable + 1 if new == count else 0
        count = new
    return count
