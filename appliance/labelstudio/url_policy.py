"""Where the appliance may fetch an image from, decided on the host it will really connect to.

requests connects to the host that urllib3's ``parse_url`` finds, while ``urllib.parse`` (used for joins) may read
another one from the same string: ``http://127.0.0.1:8699\\@127.0.0.1:8680/x`` is host 127.0.0.1:8680 for
``urlsplit`` but 127.0.0.1:8699 for urllib3. So a URL is accepted only when both parsers agree on scheme, host and
port, and when it has nothing they are known to read differently (backslashes, userinfo, control characters,
non-ASCII in the authority). The API token goes only to the exact Label Studio origin; every redirect is checked
again by the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
# Where Label Studio's presign endpoint sends a signed cloud URL. A custom endpoint (MinIO, an emulator) must be
# listed in APPLIANCE_ALLOWED_IMAGE_HOSTS or, for GCS, set as STORAGE_EMULATOR_HOST.
CLOUD_STORAGE_DOMAINS = ("storage.googleapis.com", "amazonaws.com", "blob.core.windows.net")


class UrlRefused(ValueError):
    """The URL is not one the appliance fetches; the message says why and how to allow it when that is possible."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def origin(url: str) -> Origin:
    """The origin requests will connect to; raises UrlRefused when the URL could be read two ways."""
    _refuse_ambiguous_characters(url)
    try:
        ours, theirs = urlsplit(url), parse_url(url)
        split_port = ours.port
    except (ValueError, LocationParseError) as error:
        raise UrlRefused(f"malformed URL ({error})") from None
    scheme = (ours.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"unsupported URL scheme {scheme!r}: only http and https")
    if "@" in ours.netloc or theirs.auth:
        raise UrlRefused("URLs with a user name or password (user@host) are not fetched")
    host = (ours.hostname or "").lower()
    if not host:
        raise UrlRefused("URL has no host")
    their_host = (theirs.host or "").lower().strip("[]")
    port, their_port = split_port or DEFAULT_PORTS[scheme], theirs.port or DEFAULT_PORTS[scheme]
    if (theirs.scheme or "").lower() != scheme or their_host != host or their_port != port:
        raise UrlRefused("URL names two different hosts depending on how it is read")
    return Origin(scheme, host, port)


def _refuse_ambiguous_characters(url: str) -> None:
    if "\\" in url:
        raise UrlRefused("URLs with a backslash are not fetched (parsers disagree on where the host ends)")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRefused("URLs with spaces or control characters are not fetched")
    authority = url.split("//", 1)[1].split("/", 1)[0] if "//" in url else ""
    if not authority.isascii():
        raise UrlRefused("URLs with a non-ASCII host are not fetched: write the host in punycode")


class UrlPolicy:
    """Which hosts a fetch may connect to, and whether it may carry the Label Studio token."""

    def __init__(self, studio_url: str, allowed_hosts: list[str], storage_hosts: list[str] = ()) -> None:
        self.studio = origin(studio_url)
        self.allowed = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.storage = {h.strip().lower() for h in storage_hosts if h.strip()}

    def is_studio(self, url: str) -> bool:
        """True only for Label Studio's exact origin: the one place the token may go."""
        try:
            return origin(url) == self.studio
        except UrlRefused:
            return False

    def check(self, url: str, from_presign: bool = False) -> Origin:
        """The URL's origin if it may be fetched; ``from_presign`` also admits cloud storage hosts."""
        found = origin(url)
        if found == self.studio or self._listed(found, self.allowed):
            return found
        if from_presign and (self._listed(found, self.storage) or _in_cloud_domain(found.host)):
            return found
        raise UrlRefused(f"refusing to fetch from host {found.host!r} (port {found.port}): it is not Label Studio; "
                         f"add it to APPLIANCE_ALLOWED_IMAGE_HOSTS to allow it")

    @staticmethod
    def _listed(found: Origin, hosts: set[str]) -> bool:
        return found.host in hosts or f"{found.host}:{found.port}" in hosts


def _in_cloud_domain(host: str) -> bool:
    return any(host == domain or host.endswith("." + domain) for domain in CLOUD_STORAGE_DOMAINS)
