"""Fetching task images from Label Studio (or allowed hosts) and decoding them safely. Pure: no Flask.

Both ML backends use this module: ``ImageFetcher.fetch`` turns a task's image URL into bytes, ``decode_image``
turns bytes into an RGB uint8 array with EXIF orientation applied.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from appliance.labelstudio.url_policy import UrlPolicy, UrlRefused

# decode_image's max_pixels, checked from the header before any pixel is decoded, is the real limit. PIL's own
# process-wide guard stays as a backstop for other callers, raised so that refusing a bomb here does not also
# log PIL's DecompressionBombWarning (PIL warns above this and refuses above twice this).
Image.MAX_IMAGE_PIXELS = 1_000_000_000

CLOUD_SCHEMES = ("gs", "s3", "azure-blob")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class ImageError(ValueError):
    """The image cannot be fetched or decoded; the message says why."""


# --- decoding ---------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an RGB uint8 HxWx3 array, EXIF orientation applied."""
    if not data:
        raise ImageError("empty image data")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        _check_pixels(image, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large ({_first_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not a supported image ({_first_line(exc)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt pixel data
        raise ImageError(f"corrupt or truncated image ({_first_line(exc)})") from exc


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth: stretch to 8 bits
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- fetching ---------------------------------------------------------------------------------
class ImageFetcher:
    """Fetch task images: Label Studio paths with the API token, cloud URIs via Label Studio's presign
    endpoint, other hosts only when listed in ``allowed_hosts`` (an SSRF guard). Every URL and every redirect
    goes through one ``UrlPolicy``: the token is never logged and never sent to another origin."""

    def __init__(self, base_url: str, token: str, allowed_hosts: list[str], max_bytes: int,
                 retries: int = 2, timeout: float = 10, storage_hosts: list[str] = ()) -> None:
        try:
            self.policy = UrlPolicy(base_url, allowed_hosts, storage_hosts)
        except UrlRefused as error:
            raise ValueError(f"Label Studio URL must be http(s)://host[:port], got {base_url!r}: {error}") from None
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.session = _session(retries)

    @classmethod
    def from_settings(cls, settings) -> "ImageFetcher":
        """The fetcher every process uses: Label Studio, the allowed hosts and the GCS emulator if one is set."""
        storage = [urlsplit(settings.storage_emulator_host).netloc] if settings.storage_emulator_host else []
        return cls(settings.studio_base_url, settings.secret("api_key"), settings.allowed_image_hosts,
                   settings.image_max_mb * 1024 * 1024, storage_hosts=storage)

    def __repr__(self) -> str:  # keeps the token out of logs and tracebacks
        return f"ImageFetcher(base_url={self.base_url!r}, allowed_hosts={sorted(self.policy.allowed)!r})"

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """Bytes of the image at ``url`` (a task's image value), at most ``max_bytes``."""
        url = (url or "").strip()
        if not url:
            raise ImageError("task has no image URL")
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._data_uri(url)
        if scheme in CLOUD_SCHEMES:
            return self._get(self._presign_url(url, task_id), shown=url, presigned=True)
        if not scheme:  # a Label Studio path; joined by hand so "//other-host/x" cannot leave Label Studio
            return self._get(f"{self.base_url}/{url.lstrip('/')}", shown=url)
        if scheme in ("http", "https"):
            return self._get(url, shown=url)
        raise ImageError(f"unsupported image URL scheme {scheme!r} in {url!r}")

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        try:
            task = int(task_id)
        except (TypeError, ValueError):
            raise ImageError(f"{uri!r} is in cloud storage: presigning it through Label Studio needs the task id "
                             f"(a number), got {task_id!r}") from None
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{self.base_url}/tasks/{task}/presign/?fileuri={fileuri}"

    def _check(self, url: str, shown: str, presigned: bool = False) -> None:
        try:
            self.policy.check(url, from_presign=presigned)
        except UrlRefused as error:
            raise ImageError(f"image {shown!r}: {error}") from None

    def _headers(self, url: str) -> dict[str, str]:
        return {"Authorization": f"Token {self._token}"} if self.policy.is_studio(url) else {}

    def _get(self, url: str, shown: str, presigned: bool = False) -> bytes:
        """GET with redirects followed by hand, so each hop is checked and the token stays on Label Studio.

        Redirects out of a presign request may also go to cloud storage hosts (the signed URL); every hop,
        the first included, must pass the same policy.
        """
        self._check(url, shown)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self.session.get(url, headers=self._headers(url), stream=True,
                                            timeout=self.timeout, allow_redirects=False)
            except (requests.RequestException, ValueError) as exc:  # ValueError: requests reading a bad Location
                raise ImageError(f"cannot fetch image {shown!r}: {type(exc).__name__}") from exc
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers["Location"])
                    self._check(url, shown, presigned)
                    continue
                _check_status(response, shown)
                return self._read(response, shown)
        raise ImageError(f"image {shown!r}: more than {MAX_REDIRECTS} redirects")

    def _read(self, response: requests.Response, shown: str) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"image {shown!r} is {declared} bytes, over the limit of {self.max_bytes}")
        deadline = time.monotonic() + 3 * self.timeout  # a trickling server cannot hold the worker forever
        buffer = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                buffer += chunk
                if len(buffer) > self.max_bytes:
                    raise ImageError(f"image {shown!r} is over the limit of {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageError(f"image {shown!r} took over {3 * self.timeout:g} s to download")
        except requests.RequestException as exc:
            raise ImageError(f"cannot fetch image {shown!r}: {type(exc).__name__}") from exc
        return bytes(buffer)

    def _data_uri(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=False) if header.endswith(";base64") \
                else unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("malformed data: URI image") from exc
        if len(data) > self.max_bytes:
            raise ImageError(f"data: URI image is {len(data)} bytes, over the limit of {self.max_bytes}")
        return data


def _session(retries: int) -> requests.Session:
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.2,
                  status_forcelist=(500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                  raise_on_status=False, redirect=False)
    session = requests.Session()
    session.trust_env = False  # no ~/.netrc credentials or proxy variables slipped into image requests
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _check_status(response: requests.Response, shown: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise ImageError(f"Label Studio refused access to image {shown!r} (HTTP {status}): "
                         f"check the API token the backend uses")
    if status == 404:
        raise ImageError(f"image {shown!r} not found (HTTP 404)")
    if not 200 <= status < 300:
        raise ImageError(f"fetching image {shown!r} failed with HTTP {status}")
