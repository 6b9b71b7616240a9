"""Pre-annotation backend (model adapter). Until a model serves it predicts nothing, and says so."""

from __future__ import annotations

from appliance.backends import serve
from appliance.backends.protocol import Backend, PredictRequest
from appliance.settings import Settings


class PredictBackend(Backend):
    name = "predict"

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def model_version(self) -> str:
        return "no-model"

    def status(self) -> dict:
        return {"serving": None, "message": "no model yet: annotate tasks and the trainer will publish one"}

    def predict(self, req: PredictRequest) -> list[dict]:
        return []


def create_app():
    return serve.build(PredictBackend)
