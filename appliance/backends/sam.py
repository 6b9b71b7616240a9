"""Interactive Segment Anything backend (model adapter). Until the SAM model lands it predicts nothing."""

from __future__ import annotations

from appliance.backends import serve
from appliance.backends.protocol import Backend, PredictRequest
from appliance.settings import Settings


class SamBackend(Backend):
    name = "sam"

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def model_version(self) -> str:
        return "sam-none"

    def predict(self, req: PredictRequest) -> list[dict]:
        return []


def create_app():
    return serve.build(SamBackend)
