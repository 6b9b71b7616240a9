"""The model loop as the project's instructions say it: the text the trainer writes into Label Studio."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from appliance.models.registry import VersionInfo
from appliance.settings import load_settings
from appliance.trainer.instructions import BEGIN, END, merge, render


def settings(tmp_path):
    return load_settings({"APPLIANCE_DATA_DIR": str(tmp_path), "APPLIANCE_TRAIN_MIN_NEW": "10",
                          "APPLIANCE_TRAIN_QUIET_SECONDS": "600"})


def test_no_model_says_so_and_counts_the_annotations_until_the_first_run(tmp_path):
    text = render(None, {"state": "idle", "pending_changes": 3}, settings(tmp_path))
    assert "No model yet" in text and "after <b>7</b> more annotation(s), or 600 s after the last one" in text


def test_serving_model_with_its_held_out_figures_and_a_run_in_progress(tmp_path):
    serving = VersionInfo("v0003", Path("."), datetime.now(), {"segm_AP50": 0.5861, "bbox_AP50": 0.6, "images": 4})
    running = {"state": "running", "stage": "train", "epoch": 3, "max_epochs": 12, "eta_s": 41.6,
               "last": {"run": "r1", "result": "rejected", "why": "not better than the serving model"}}
    text = render(serving, running, settings(tmp_path))
    assert "Serving model v0003</b>: mask AP50 0.59, box AP50 0.60 on 4 held-out image(s)" in text
    assert "Training now</b> (train, epoch 3/12, about 42 s left)" in text
    assert "Last run r1: rejected: not better than the serving model" in text


def test_the_managers_own_instructions_are_kept():
    first = merge("<p>Label every cell, even cut ones.</p>", "<h3>Model</h3>A")
    assert first.startswith("<p>Label every cell, even cut ones.</p>") and first.count(BEGIN) == 1
    second = merge(first + "<p>Added later.</p>", "<h3>Model</h3>B")
    assert "Model</h3>B" in second and "Model</h3>A" not in second and second.endswith("<p>Added later.</p>")
    assert second.count(BEGIN) == second.count(END) == 1
    assert merge("", "X") == f"{BEGIN}\nX\n{END}"


def test_no_model_answers_one_empty_list_per_task(tmp_path):
    """Label Studio logs an ERROR for an empty "results" (label_studio/ml/models.py); one empty list per task is
    "no prediction" to it, silently."""
    from appliance.backends.predict import PredictBackend
    from appliance.backends.protocol import create_app
    from appliance.template import default_template
    from test_fuzz import make_settings

    client = create_app(PredictBackend(make_settings(tmp_path))).test_client()
    tasks = [{"id": 1, "data": {"image": "data:,"}}, {"id": 2, "data": {"image": "data:,"}}]
    answer = client.post("/predict", json={"tasks": tasks, "label_config": default_template(["Person"], [])})
    assert answer.status_code == 200 and answer.get_json()["results"] == [[], []]
