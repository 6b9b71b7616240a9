"""State shared by several machines (APPLIANCE_SHARED_STATE) against a real GCS emulator: the model registry
followed by every node, the annotation journal mirrored into a trainer's folder, and the cross-machine training
lock (a GCS lease here; the PostgreSQL advisory lock in test_postgres.py). Each "node" is its own data dir."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from appliance.settings import load_settings
from appliance.shared.journal import JournalMirror
from appliance.shared.lock import GcsLease, gcs_lease, training_lock
from appliance.shared.registry import SharedRegistry, open_registry
from appliance.trainer.journal import JournalWatcher
from harness import gcs_emulator

BUCKET = "appliance-shared"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), (BUCKET,)) as found:
        yield found


@pytest.fixture
def prefix(request) -> str:
    return f"site-{request.node.name[:40]}"  # a fresh shared folder per test, in one bucket


def node(tmp_path: Path, emulator, prefix: str, name: str, **env: str):
    return load_settings({"APPLIANCE_DATA_DIR": str(tmp_path / name), "STORAGE_EMULATOR_HOST": emulator[0],
                          "APPLIANCE_SHARED_STATE": f"gs://{BUCKET}/{prefix}", "APPLIANCE_SHARED_POLL_SECONDS": "1",
                          **env})


def model_dir(tmp_path: Path, tag: str) -> Path:
    folder = tmp_path / f"model-{tag}"
    folder.mkdir()
    for name in ("config.py", "weights.pth", "classes.json"):
        (folder / name).write_text(f"{tag}:{name}")
    return folder


def test_a_version_published_on_one_node_is_followed_by_the_others(tmp_path, emulator, prefix):
    trainer = open_registry(node(tmp_path, emulator, prefix, "trainer"))
    predictor = open_registry(node(tmp_path, emulator, prefix, "predictor"))
    assert isinstance(trainer, SharedRegistry) and predictor.current() is None

    first = trainer.publish(model_dir(tmp_path, "a"), {"mask_ap50": 0.4})
    predictor.pull(force=True)
    serving = predictor.current()
    assert serving.version == first and serving.metrics["mask_ap50"] == 0.4
    assert (serving.path / "weights.pth").read_text() == "a:weights.pth"  # the files came along, complete
    assert predictor.root != trainer.root

    second = trainer.publish(model_dir(tmp_path, "b"))
    predictor.pull(force=True)
    assert predictor.current().version == second
    # A rollback made on any node is followed everywhere, the trainer's node included.
    predictor.use(first)
    trainer.pull(force=True)
    assert trainer.current().version == first
    # A node that never saw the newest version still numbers above it: numbers are unique across machines.
    late = open_registry(node(tmp_path, emulator, prefix, "late"))
    late.pull(force=True)
    third = late.publish(model_dir(tmp_path, "c"))
    assert int(third[1:5]) == int(second[1:5]) + 1
    assert late.remote_versions() == [first, second, third]
    assert late.prune(keep=1) == [first] and late.remote_versions() == [third]  # the shared registry pruned too


def test_an_unreachable_shared_registry_keeps_the_node_serving(tmp_path, emulator, prefix):
    trainer = open_registry(node(tmp_path, emulator, prefix, "trainer"))
    version = trainer.publish(model_dir(tmp_path, "a"))
    predictor = open_registry(node(tmp_path, emulator, prefix, "predictor"))
    predictor.pull(force=True)
    cut_off = SharedRegistry(predictor.root, open_registry(node(
        tmp_path, emulator, prefix, "x", STORAGE_EMULATOR_HOST="http://127.0.0.1:9")).shared, 1)
    assert cut_off.pull(force=True) is None and "unreachable" in cut_off.error
    assert cut_off.current().version == version
    # A pointer to a version that is not there whole (a hand-edited bucket): logged, and the node keeps serving.
    emulator[1].bucket(BUCKET).blob(f"{prefix}/models/versions/v0009-20261130T000000/config.py").upload_from_string("x")
    emulator[1].bucket(BUCKET).blob(f"{prefix}/models/current").upload_from_string("v0009-20261130T000000")
    assert predictor.pull(force=True) is None and "lacks" in predictor.error
    assert predictor.current().version == version


def test_the_journal_is_mirrored_into_the_trainers_folder(tmp_path, emulator, prefix):
    settings = node(tmp_path, emulator, prefix, "trainer")
    bucket = emulator[1].bucket(BUCKET)
    wake = threading.Event()
    watcher = JournalWatcher([settings.journal_dir], wake)
    settings.journal_dir.mkdir(parents=True)
    watcher.start()
    mirror = JournalMirror(settings)
    bucket.blob(f"{prefix}/journal/11").upload_from_string('{"id": 1, "annotations": [{"id": 11}]}')
    bucket.blob(f"{prefix}/journal/12").upload_from_string('{"id": 2, "annotations": [{"id": 12}]}')
    assert mirror.sync() == 2 and mirror.sync() == 0  # nothing is downloaded twice
    local = settings.journal_dir / "11"
    assert local.read_text() == '{"id": 1, "annotations": [{"id": 11}]}'
    assert abs(local.stat().st_mtime - bucket.get_blob(f"{prefix}/journal/11").updated.timestamp()) < 1e-3
    bucket.blob(f"{prefix}/journal/11").upload_from_string('{"id": 1, "annotations": [{"id": 11, "v": 2}]}')
    bucket.blob(f"{prefix}/journal/12").delete()  # an annotation deleted in Label Studio
    assert mirror.sync() == 2
    assert '"v": 2' in local.read_text() and not (settings.journal_dir / "12").exists()
    deadline = time.time() + 10
    while watcher.pending(settings.journal_dir)[0] < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert wake.is_set() and watcher.pending(settings.journal_dir)[0] == 2  # the trainer wakes as on one machine
    assert not list(settings.journal_dir.glob(".*"))  # no half files where the trainer reads


def test_one_training_run_at_a_time_across_machines(tmp_path, emulator, prefix):
    one = node(tmp_path, emulator, prefix, "one", APPLIANCE_TRAINER_LEASE_SECONDS="30")
    two = node(tmp_path, emulator, prefix, "two", APPLIANCE_TRAINER_LEASE_SECONDS="30")
    with training_lock(one) as held:
        assert held
        with training_lock(two) as other:
            assert not other  # another machine, the same shared folder: refused at once
    with training_lock(two) as held:
        assert held  # released on exit


def test_a_crashed_trainers_lease_is_taken_over_and_its_late_renewal_refused(tmp_path, emulator, prefix):
    settings = node(tmp_path, emulator, prefix, "one", APPLIANCE_TRAINER_LEASE_SECONDS="5")
    crashed = GcsLease(settings)
    assert crashed.acquire()  # then it never renews nor releases (killed)
    assert not GcsLease(settings).acquire()
    time.sleep(5.5)
    with gcs_lease(settings) as held:
        assert held and held.still_held()
        stop = threading.Event()
        threading.Timer(3, stop.set).start()
        crashed.keep(stop)  # the crashed one comes back and tries to renew: its generation is stale
        assert crashed.lost.is_set() and not crashed.renew()  # so its run would not publish
        assert not GcsLease(settings).acquire()  # the new holder keeps it
        assert held.still_held()
        emulator[1].bucket(BUCKET).blob(f"{prefix}/locks/training").upload_from_string("{}")  # taken from us
        assert not held.still_held()


def test_a_shared_state_setting_is_checked_in_one_line():
    from appliance.settings import ConfigError

    for value, expected in (("s3://bucket/x", "gs://bucket"), ("gs://Bad_Bucket!", "bucket")):
        with pytest.raises(ConfigError) as caught:
            load_settings({"APPLIANCE_SHARED_STATE": value, "APPLIANCE_DATA_DIR": os.devnull + "x"})
        assert "APPLIANCE_SHARED_STATE" in caught.value.line and expected in caught.value.line


def test_an_embedding_computed_on_one_machine_is_read_on_another(tmp_path, emulator, prefix):
    import numpy as np

    from appliance.models.sam.store import EmbeddingStore
    from appliance.shared.embeddings import shared_embeddings

    sam_node, trainer_node = (node(tmp_path, emulator, prefix, name) for name in ("sam", "trainer"))
    sam = EmbeddingStore(sam_node.embeddings_dir, 64 << 20, remote=shared_embeddings(sam_node))
    trainer = EmbeddingStore(trainer_node.embeddings_dir, 64 << 20, remote=shared_embeddings(trainer_node))
    embedding = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float32)
    assert trainer.get("k" * 16) is None  # nobody computed it yet
    sam.put("k" * 16, embedding)
    sam.remote.flush()
    assert np.array_equal(trainer.get("k" * 16), embedding)  # fetched, not recomputed
    assert "k" * 16 in trainer and trainer.stats()["files"] == 1  # and kept in the node's own store
    names = [b.name for b in emulator[1].bucket(BUCKET).list_blobs(prefix=f"{prefix}/embeddings/")]
    assert names == [f"{prefix}/embeddings/vit_t-{'k' * 16}.npy"]
    sam.put("k" * 16, embedding)  # written once: a second machine's identical upload is a no-op
    sam.remote.flush()
    cut_off = EmbeddingStore(tmp_path / "cut", 64 << 20, remote=shared_embeddings(
        node(tmp_path, emulator, prefix, "x", STORAGE_EMULATOR_HOST="http://127.0.0.1:9")))
    assert cut_off.get("k" * 16) is None and cut_off.remote.error  # a miss (encode locally), said once in the log
    assert not list((tmp_path / "cut").glob("*"))  # no half file left behind


def test_status_shows_the_shared_registry_and_the_lock(tmp_path, emulator, prefix):
    from appliance.status import render, shared_state

    trainer_node, predictor_node = (node(tmp_path, emulator, prefix, n) for n in ("trainer", "predictor"))
    version = open_registry(trainer_node).publish(model_dir(tmp_path, "a"))
    info = shared_state(predictor_node)
    assert info["current"] == version and info["this_node"] is None and info["training_lock"] == "GCS lease"
    open_registry(predictor_node).pull(force=True)
    assert shared_state(predictor_node)["this_node"] == version
    text = render({"processes": "supervisord is not running", "project": "not bootstrapped yet",
                   "serving_model": "prediction backend does not answer", "trainer": {},
                   "shared": shared_state(predictor_node)}, predictor_node)
    assert f"models/current = {version} (this node: {version})" in text and "training lock: GCS lease" in text


def test_a_one_machine_appliance_moves_its_model_onto_shared_state(tmp_path, emulator, prefix):
    from appliance.models.registry import ModelRegistry

    settings = node(tmp_path, emulator, prefix, "old")
    version = ModelRegistry(settings.models_dir).publish(model_dir(tmp_path, "a"))  # before shared state was set
    registry = open_registry(settings)
    assert registry.remote_current() is None and registry.current().version == version  # nothing to follow yet
    registry.use(version)  # `appliance model use <its current version>`
    newcomer = open_registry(node(tmp_path, emulator, prefix, "new"))
    newcomer.pull(force=True)
    assert newcomer.current().version == version
    assert (newcomer.current().path / "config.py").read_text() == "a:config.py"
