"""Property-based fuzzing of the ML backend protocol with the REAL backends, in-process (Flask's test client).

Both backends run on a temporary data dir with Label Studio unreachable: Label Studio image paths fail to fetch,
which must become per-task errors; ``data:`` URIs carry small real images so the models do run. The prediction
backend serves a randomly initialised RTMDet-Ins (score threshold 0, so it does return regions); SAM is MobileSAM.
For any JSON body: no 5xx, a JSON answer, and /health still 200 afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from appliance.backends.protocol import create_app
from appliance.secrets import ensure_secrets
from appliance.settings import load_settings
from appliance.template import default_template
from harness import free_port
from random_model import random_model

LABELS = ["Person", "Animal", "Vehicle", "Object"]
TEMPLATE = default_template(LABELS, [])
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _png(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


GOOD_IMAGES = [_png(64, 48, 1), _png(40, 40, 2)]  # few distinct images: SAM encodes each once, then caches
BAD_IMAGES = [
    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).decode(),  # truncated
    "data:image/png;base64,!!!not-base64",
    "data:text/plain,hello",
    "/data/local-files/?d=images/missing.png",  # Label Studio path: unreachable here
    "gs://bucket/object.png",  # presigned through Label Studio: unreachable
    "http://169.254.169.254/latest/meta-data/",  # not an allowed host
    "file:///etc/passwd",
    "",
]


def make_settings(data_dir, **extra):
    values = {"APPLIANCE_DATA_DIR": str(data_dir), "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",
              "APPLIANCE_LABELS": ",".join(LABELS), "APPLIANCE_SCORE_THRESHOLD": "0.0",
              "APPLIANCE_SAM_PREFETCH": "1", "APPLIANCE_DEVICE": "cpu", "APPLIANCE_TRAIN_IMG_SIZE": "128",
              **extra}
    s = load_settings(values)
    ensure_secrets(s)
    return s


def wait_ready(client, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = client.get("/health").get_json()
        if health.get("ready"):
            return
        assert not health.get("error"), health
        time.sleep(0.5)
    pytest.fail(f"backend not ready in {seconds} s: {client.get('/health').get_json()}")


@pytest.fixture(scope="module")
def predict_client(tmp_path_factory):
    from appliance.backends.predict import PredictBackend

    s = make_settings(tmp_path_factory.mktemp("fuzz-predict"))
    random_model(s.models_dir, ["person", "Animal", "car"])
    app = create_app(PredictBackend(s))
    client = app.test_client()
    wait_ready(client)
    return client


@pytest.fixture(scope="module")
def sam_client(tmp_path_factory):
    from appliance.backends.sam import SamBackend

    s = make_settings(tmp_path_factory.mktemp("fuzz-sam"))
    app = create_app(SamBackend(s))
    client = app.test_client()
    wait_ready(client)
    return client


# --- strategies --------------------------------------------------------------------------------
HUGE = st.sampled_from([10**30, -10**30, 10**400, 1e308, -1e308, 2**63, float("inf"), float("nan")])
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), HUGE,
                   st.floats(-5, 105))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, st.text(max_size=20))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
LABEL = st.one_of(st.sampled_from(LABELS), st.text(max_size=10))
LABEL_LIST = st.one_of(st.lists(LABEL, max_size=2), SCALAR, st.lists(SCALAR, max_size=2))
# Sizes stay below 4096: a huge original_width/height makes SAM resize its mask to that size (see the report).
SIZE = st.one_of(st.none(), st.integers(-5, 4096), st.text(max_size=5), st.floats(0, 5000))


@st.composite
def region(draw) -> dict:
    kind = draw(st.sampled_from(["keypointlabels", "rectanglelabels", "brushlabels", "polygonlabels", "x", None]))
    value = {key: draw(st.one_of(NUMBER, SCALAR)) for key in draw(st.sets(st.sampled_from(
        ["x", "y", "width", "height", "rotation"]), max_size=5))}
    if draw(st.booleans()) and kind:
        value[kind] = draw(LABEL_LIST)
    out = {"type": kind, "value": draw(st.one_of(st.just(value), JSON)),
           "from_name": draw(st.sampled_from(["point", "box", "mask", "zzz"])), "to_name": "image",
           "original_width": draw(SIZE), "original_height": draw(SIZE)}
    if draw(st.booleans()):
        out["is_positive"] = draw(SCALAR)
    return out


@st.composite
def good_click(draw) -> dict:
    """A well-formed click, so the whole SAM path (embedding, decoder, masks, resize) runs too."""
    label = draw(st.sampled_from(LABELS))
    return {"type": "keypointlabels", "from_name": "point", "to_name": "image", "is_positive": draw(st.booleans()),
            "original_width": draw(st.sampled_from([64, 40, 100, None])),
            "original_height": draw(st.sampled_from([48, 40, 75, None])),
            "value": {"x": draw(st.floats(0, 100)), "y": draw(st.floats(0, 100)), "keypointlabels": [label]}}


@st.composite
def task(draw, chaotic: bool = False) -> dict:
    data = draw(st.dictionaries(st.text(max_size=6), SCALAR, max_size=2))
    image = draw(st.one_of(st.sampled_from(GOOD_IMAGES + BAD_IMAGES), st.sampled_from(GOOD_IMAGES), SCALAR))
    if draw(st.integers(0, 5)):
        data[draw(st.sampled_from(["image", "image", "$undefined$", "img"]))] = image
    out = {"data": draw(JSON) if chaotic else data}
    if draw(st.integers(0, 3)):
        out["id"] = draw(st.one_of(st.integers(0, 10**6), st.integers(0, 10**6), HUGE, SCALAR))
    return out


CONFIG = st.one_of(st.just(TEMPLATE), st.text(max_size=40), st.none(), SCALAR,
                   st.sampled_from(["<View></View>", "<View><Image name='image' value='$image'/></View>",
                                    "<View><Image name='i' value='$image'/><BrushLabels name='m' toName='i'>"
                                    "<Label value='Person'/></BrushLabels></View>", "<View><Image", TEMPLATE[:-20]]))


@st.composite
def predict_body(draw):
    """Mostly well-formed requests carrying odd values (so the models run), some plain chaos."""
    mode = draw(st.sampled_from(["interactive"] * 5 + ["batch"] * 3 + ["chaos"] * 2))
    if mode == "chaos":
        if draw(st.booleans()):
            return draw(JSON)  # not even an object, most of the time
        body = {"tasks": draw(st.one_of(st.lists(task(chaotic=True), max_size=3), JSON)),
                "params": draw(JSON), "label_config": draw(CONFIG)}
        return body
    tasks = draw(st.lists(task(), min_size=1, max_size=1 if mode == "interactive" else 4))
    body = {"tasks": tasks, "label_config": TEMPLATE if draw(st.integers(0, 5)) else draw(CONFIG)}
    if mode == "interactive":
        regions = draw(st.lists(st.one_of(good_click(), good_click(), region(), JSON), min_size=1, max_size=4))
        odd_context = st.one_of(JSON, st.fixed_dictionaries({"result": JSON}))
        body["params"] = {"context": {"result": regions} if draw(st.integers(0, 9)) else draw(odd_context)}
    if draw(st.booleans()):
        body["project"] = draw(st.one_of(st.sampled_from(["1.1700000000", "7"]), SCALAR))
    return body


@st.composite
def webhook_body(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    body = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=3))
    body["action"] = draw(st.one_of(st.sampled_from(["TASKS_CREATED", "ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                                     "START_TRAINING", "PROJECT_UPDATED", ""]), SCALAR))
    if draw(st.booleans()):
        body["project"] = draw(st.one_of(st.fixed_dictionaries({"id": SCALAR, "label_config": CONFIG}), JSON))
    if draw(st.booleans()):
        body["tasks"] = draw(st.one_of(st.lists(task(), max_size=3), JSON))
    if draw(st.booleans()):
        body["task"] = draw(st.one_of(task(), JSON))
    return body


def post(client, path: str, body) -> None:
    raw = json.dumps(body)  # NaN and Infinity as Python writes them; Flask's parser reads them back
    response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code < 500, (path, response.status_code, response.get_data(as_text=True)[:500], raw[:2000])
    assert response.is_json and response.get_json() is not None, response.get_data(as_text=True)[:200]
    if path == "/predict" and response.status_code == 200:
        results = response.get_json()["results"]
        tasks = body["tasks"]
        assert results == [] or len(results) == len(tasks)
        for result in results:  # a prediction, an error, or an empty list: no prediction for this task
            assert result == [] or isinstance(result, dict) and ("error" in result or "result" in result), result
    assert client.get("/health").status_code == 200


@FUZZ
@given(body=predict_body())
def test_predict_backend_predict(predict_client, body):
    post(predict_client, "/predict", body)


@FUZZ
@given(body=webhook_body())
def test_predict_backend_webhook(predict_client, body):
    post(predict_client, "/webhook", body)


@FUZZ
@given(body=predict_body())
def test_sam_backend_predict(sam_client, body):
    post(sam_client, "/predict", body)


@FUZZ
@given(body=webhook_body())
def test_sam_backend_webhook(sam_client, body):
    post(sam_client, "/webhook", body)


def test_good_requests_still_work_after_the_fuzzing(predict_client, sam_client):
    task = {"id": 1, "data": {"image": GOOD_IMAGES[0]}}
    predicted = predict_client.post("/predict", json={"tasks": [task], "label_config": TEMPLATE}).get_json()
    assert "result" in predicted["results"][0], predicted
    click = {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": 64,
             "original_height": 48, "value": {"x": 50, "y": 50, "keypointlabels": ["Person"]}}
    answer = sam_client.post("/predict", json={"tasks": [task], "label_config": TEMPLATE,
                                               "params": {"context": {"result": [click]}}}).get_json()
    region = answer["results"][0]["result"][0]
    assert region["type"] == "brushlabels" and region["original_width"] == 64, answer
    assert predict_client.get("/health").get_json()["ready"] and sam_client.get("/health").get_json()["ready"]
