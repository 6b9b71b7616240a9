"""Talking to Label Studio's API: one authenticated SDK client and the waits around start-up."""

from __future__ import annotations

import time

import requests
from label_studio_sdk.client import LabelStudio

from appliance.settings import Settings


def client(settings: Settings, timeout: float = 30) -> LabelStudio:
    return LabelStudio(base_url=settings.studio_base_url, api_key=settings.secret("api_key"), timeout=timeout)


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
