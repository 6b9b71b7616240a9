"""Shared fixtures: the real appliance started by its real entrypoint on a temporary volume."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import ARTIFACTS, ROOT, Appliance, appliance_env, free_port  # noqa: F401  (re-exported for tests)


# The fast tier (`make test-fast`) leaves out every test that starts an appliance, trains a model or soaks:
# those using the appliance fixtures, and the modules below, which start their own or train.
APPLIANCE_FIXTURES = {"appliance", "default_appliance"}
HEAVY_MODULES = {"test_browser", "test_detection", "test_faults", "test_gcs", "test_orphans", "test_postgres",
                 "test_sam_prompt", "test_sam_service", "test_samdet", "test_shared_state", "test_soak", "test_trainer",
                 "test_trainer_robustness", "test_trainer_service", "test_listen"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in HEAVY_MODULES or APPLIANCE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def appliance(tmp_path_factory, artifacts) -> Appliance:
    data_dir = tmp_path_factory.mktemp("volume") / "data"
    # The prediction tests train a tiny model on classes "circle" and "rectangle": map one, leave one unknown.
    # The trainer test submits a burst of annotations: train after it, small and fast enough for CI.
    env = appliance_env(data_dir, APPLIANCE_LABEL_MAP="circle:Object", APPLIANCE_SCORE_THRESHOLD="0.0",
                        APPLIANCE_TRAIN_MIN_NEW="12", APPLIANCE_TRAIN_QUIET_SECONDS="86400",
                        APPLIANCE_TRAIN_EPOCHS="40", APPLIANCE_TRAIN_IMG_SIZE="192", APPLIANCE_TRAIN_THREADS="2",
                        APPLIANCE_ANNOTATORS="Ana@Example.org,bo@example.org")
    app = Appliance(env=env, log_path=artifacts / "appliance.log")
    app.log_path.write_text("")
    app.start()
    yield app
    if app.proc and app.proc.poll() is None:
        app.stop()


@pytest.fixture(scope="session")
def default_appliance(tmp_path_factory, artifacts) -> Appliance:
    """An appliance on its defaults, shared by the hostile-input tests (test_attacks, test_bad_images): each
    publishes its own random model and adds its own tasks, and none depends on the other's."""
    app = Appliance(env=appliance_env(tmp_path_factory.mktemp("defaults") / "data"),
                    log_path=artifacts / "appliance-defaults.log")
    app.log_path.write_text("")
    try:
        app.start()
        yield app
    finally:
        if app.proc is not None and app.proc.poll() is None:
            app.stop()
