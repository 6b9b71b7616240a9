"""The trainer under the conditions a review found: a run that never ends, a "Start training" while another run
holds the lock, a rollback made during a run, and re-prediction kept out of the training lock."""

from __future__ import annotations

import threading

from appliance.models.registry import ModelRegistry
from appliance.settings import load_settings
from appliance.trainer.build import DatasetError
from appliance.shared.run_requests import request_run
from appliance.trainer.service import Trainer, training_lock
from random_model import random_model
from synthetic import make_dataset
from test_trainer import LABELS, synthetic_build


def settings_for(tmp_path, **env):
    return load_settings({"APPLIANCE_DATA_DIR": str(tmp_path), "APPLIANCE_REPREDICT": "false", **env})


def test_a_run_over_the_time_limit_is_stopped_and_the_serving_model_stays(tmp_path):
    make_dataset(tmp_path / "train", 4, LABELS, seed=1)
    make_dataset(tmp_path / "holdout", 2, LABELS, seed=2)
    settings = settings_for(tmp_path, APPLIANCE_TRAIN_TIMEOUT_MINUTES="0.05", APPLIANCE_TRAIN_EPOCHS="50")
    serving = random_model(settings.models_dir, LABELS)
    outcome = Trainer(settings, build=synthetic_build(tmp_path / "train", tmp_path / "holdout")).run("slow")
    assert outcome["result"] == "failed" and "took over 0.05 min" in outcome["error"], outcome
    assert "APPLIANCE_TRAIN_TIMEOUT_MINUTES" in outcome["error"]
    assert ModelRegistry(settings.models_dir).current().version == serving


def test_start_training_while_another_run_holds_the_lock_is_kept_not_dropped(tmp_path):
    settings = settings_for(tmp_path)
    builds = []

    def build(settings, work):
        builds.append(work)
        raise DatasetError("no annotations yet")

    trainer = Trainer(settings, build=build)
    request = request_run(settings, "Start training (Label Studio)")
    holding, release = threading.Event(), threading.Event()

    def other_run():
        with training_lock(settings):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=other_run)
    thread.start()
    holding.wait(10)
    try:
        assert trainer.tick() == {"result": "busy"}
        assert request.exists() and builds == []  # the request waits for the lock
    finally:
        release.set()
        thread.join()
    outcome = trainer.tick()
    assert outcome["result"] == "failed" and "no annotations yet" in outcome["error"]
    assert not request.exists() and len(builds) == 1
    assert trainer.tick() is None  # served once


def held_out(actions: int) -> dict:
    """A model's held-out figures: ``actions`` where SAM clicks alone need 30 on 4 photos."""
    return {"segm_mAP": 0.5, "bbox_mAP": 0.5, "cost": {"photos": 4, "objects": 10, "kept": 5, "deleted": 1,
                                                       "clicks": actions - 5, "actions": actions, "sam_only": 30}}


def test_a_rollback_made_during_a_run_is_not_overridden_by_its_publish(tmp_path):
    settings = settings_for(tmp_path)
    registry = ModelRegistry(settings.models_dir)
    first = random_model(settings.models_dir, LABELS)
    second = random_model(settings.models_dir, LABELS)
    trainer = Trainer(settings)
    trainer.started_from = second  # the run began while `second` served
    registry.use(first)  # `appliance model use` during the run
    outcome = trainer._decide(tmp_path / "candidate", {"candidate": held_out(20), "current": held_out(25)}, None)
    assert outcome["result"] == "rejected" and "changed during the run" in outcome["why"], outcome
    assert registry.current().version == first and len(registry.list()) == 2


def test_repredict_runs_after_the_lock_is_released(tmp_path):
    settings = settings_for(tmp_path, APPLIANCE_REPREDICT="true")
    trainer = Trainer(settings)
    seen = []
    trainer.run = lambda reason, waited=None, requests=(): {"result": "published", "version": "v9", "run": "r"}

    def repredict(version):
        with training_lock(settings) as free:  # another run could start now
            seen.append((version, bool(free)))
        return 3

    trainer._repredict = repredict
    request_run(settings, "manual")
    outcome = trainer.tick()
    assert seen == [("v9", True)] and outcome["repredicted"] == 3


def test_a_run_that_lost_the_training_lock_does_not_publish(tmp_path):
    from appliance.shared.lock import Hold

    settings = settings_for(tmp_path)
    registry = ModelRegistry(settings.models_dir)
    serving = random_model(settings.models_dir, LABELS)
    trainer = Trainer(settings)
    trainer.started_from = serving
    trainer.hold = Hold(True, lambda: False)  # e.g. the database session ended mid-run: another run may be going
    outcome = trainer._decide(tmp_path / "candidate", {"candidate": held_out(20), "current": held_out(25)}, None)
    assert outcome["result"] == "rejected" and "training lock was lost" in outcome["why"], outcome
    assert registry.current().version == serving and len(registry.list()) == 1
