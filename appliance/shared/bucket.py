"""The shared folder: gs://bucket/prefix of APPLIANCE_SHARED_STATE, through the one GCS client (appliance.gcs)."""

from __future__ import annotations

import functools

from google.cloud import storage

from appliance import gcs
from appliance.settings import Settings

TIMEOUT = gcs.TIMEOUT
RETRY = gcs.RETRY


class SharedBucket:
    def __init__(self, settings: Settings):
        if not settings.shared_state:
            raise ValueError("APPLIANCE_SHARED_STATE is not set")
        self.settings = settings
        self.prefix = settings.shared_prefix
        self.url = settings.shared_state

    @functools.cached_property
    def bucket(self) -> storage.Bucket:
        return gcs.client(self.settings).bucket(self.settings.shared_bucket)

    def blob(self, name: str) -> storage.Blob:
        return self.bucket.blob(self.prefix + name)

    def list(self, folder: str) -> list[storage.Blob]:
        """The objects under ``folder/`` (names are full object names)."""
        return list(self.bucket.list_blobs(prefix=self.prefix + folder.rstrip("/") + "/", timeout=TIMEOUT,
                                           retry=RETRY))

    def relative(self, blob: storage.Blob) -> str:
        return blob.name[len(self.prefix):]
