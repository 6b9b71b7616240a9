"""The shared ML backend protocol module, through Flask's test client, with a small in-test backend."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.backends.protocol import Backend, PredictRequest, create_app

AUTH = ("labelstudio", "s3cret-s3cret")


class SlowLoadingBackend(Backend):
    """Loads for a while in the background, echoes task ids, records webhook events."""

    name = "echo"

    def __init__(self):
        self.loaded = threading.Event()
        self.events: list[str] = []
        self.handled = threading.Event()

    def start(self):
        threading.Thread(target=lambda: (time.sleep(2), self.loaded.set()), daemon=True).start()

    @property
    def ready(self):
        return self.loaded.is_set()

    @property
    def model_version(self):
        return "echo-1" if self.ready else "echo-loading"

    def predict(self, req: PredictRequest):
        out = []
        for task in req.tasks:
            if task["data"].get("broken"):
                out.append({"error": f"task {task['id']}: image is corrupt"})
            else:
                out.append({"result": [], "score": 0.5, "model_version": self.model_version, "task": task["id"]})
        return out

    def on_event(self, event, payload):
        time.sleep(0.5)  # slower than Label Studio's 1 s budget would allow inline, if it were inline
        self.events.append(event)
        self.handled.set()


@pytest.fixture()
def backend():
    return SlowLoadingBackend()


@pytest.fixture()
def client(backend):
    return create_app(backend, credentials=AUTH).test_client()


def call(client, method, path, **kwargs):
    return getattr(client, method)(path, auth=AUTH, **kwargs)


def test_health_and_setup_answer_while_the_model_loads(client, backend):
    began = time.monotonic()
    health = call(client, "get", "/health")
    setup = call(client, "post", "/setup", json={"project": "1.1", "schema": "<View/>", "hostname": "http://x",
                                                   "access_token": "t", "extra_params": {}})
    assert time.monotonic() - began < 1
    assert health.status_code == 200 and health.json["status"] == "UP" and health.json["ready"] is False
    assert setup.status_code == 200 and setup.json == {"model_version": "echo-loading"}


def test_predict_returns_one_result_per_task_and_per_task_errors(client):
    tasks = [{"id": 1, "data": {"image": "a"}}, {"id": 2, "data": {"broken": True}}, {"id": 3, "data": {}}]
    response = call(client, "post", "/predict", json={"tasks": tasks, "project": "1.1", "label_config": "<View/>",
                                                      "params": {"context": None}})
    results = response.json["results"]
    assert response.status_code == 200 and len(results) == 3
    assert [r.get("task") for r in results] == [1, None, 3]
    assert "corrupt" in results[1]["error"] and "result" not in results[1]


@pytest.mark.parametrize("body", [None, [], {"tasks": "x"}, {"tasks": [1]}, {"tasks": [{"id": 1}]},
                                  {"tasks": [], "params": {"context": "x"}}, {"tasks": [], "label_config": 5}])
def test_malformed_predict_is_a_400_with_a_message(client, body):
    response = call(client, "post", "/predict", json=body) if body is not None else \
        call(client, "post", "/predict", data="not json", content_type="application/json")
    assert response.status_code == 400 and response.json["error"]


def test_webhook_answers_at_once_and_handles_the_event_later(client, backend):
    began = time.monotonic()
    response = call(client, "post", "/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert time.monotonic() - began < 0.3 and response.status_code == 201
    assert backend.handled.wait(5) and backend.events == ["START_TRAINING"]
    assert call(client, "post", "/webhook", json={"project": 1}).status_code == 400


def test_versions(client):
    assert call(client, "get", "/versions").json == {"versions": ["echo-loading"]}


def test_requests_without_credentials_are_refused(client):
    assert client.get("/health").status_code == 401
    assert client.post("/predict", json={"tasks": []}, auth=("labelstudio", "wrong")).status_code == 401


def test_unexpected_errors_are_json_and_the_app_survives(backend):
    class Exploding(SlowLoadingBackend):
        def predict(self, req):
            raise ZeroDivisionError

    client = create_app(Exploding(), credentials=AUTH).test_client()
    response = call(client, "post", "/predict", json={"tasks": [{"id": 1, "data": {}}]})
    assert response.status_code == 500 and "ZeroDivisionError" in response.json["error"]
    assert call(client, "get", "/health").status_code == 200
