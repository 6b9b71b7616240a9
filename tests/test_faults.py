"""Faults found by trying to break the running appliance (issue 14, findings 7 and 8): each start-up mistake is one
line and exit 2, the backends answer 401 to any wrong credentials, the SAM backend's URL memo stays bounded and the
trainer lives through a full disk. Finding 5 (orphans) and the failed model version are in test_orphans.py."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from appliance.labelstudio.url_memo import UrlMemo
from appliance.settings import ConfigError, load_settings
from harness import ROOT, appliance_env


def up(env: dict[str, str], command: str = "up") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", command], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
    return lines[0]


@contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at ``path`` (root only): a full or read-only disk without touching the machine's."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


# --- finding 7 and the start-up errors of finding 8 -------------------------------------------
@pytest.mark.parametrize("name,value", [("APPLIANCE_SAM_PORT", "8080"), ("APPLIANCE_PREDICT_PORT", "9090"),
                                        ("APPLIANCE_LABELS", "Cat,D\x01og"), ("APPLIANCE_LABELS", "Cat\x7f")])
def test_equal_ports_and_control_characters_are_refused(name, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    assert name in caught.value.line and "\n" not in caught.value.line and caught.value.code == 2
    if "PORT" in name:
        other = "APPLIANCE_PORT" if value == "8080" else "APPLIANCE_SAM_PORT"
        assert other in caught.value.line


def test_ports_of_roles_run_elsewhere_may_be_equal():
    assert load_settings({"APPLIANCE_ROLES": "sam", "APPLIANCE_PORT": "9090"}).sam_port == 9090


def test_start_up_mistakes_are_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    env = appliance_env(data)
    same = one_line(up({**env, "APPLIANCE_SAM_PORT": env["APPLIANCE_PORT"]}))
    assert "APPLIANCE_SAM_PORT" in same and "APPLIANCE_PORT" in same
    assert "APPLIANCE_LABELS" in one_line(up({**env, "APPLIANCE_LABELS": "Cat,Do\x1bg"}))
    for xml in ("<View><Image name='image' value='$image'>", "<Image name='image' value='$image'/>"):
        assert "APPLIANCE_LABEL_CONFIG" in one_line(up({**env, "APPLIANCE_LABEL_CONFIG": xml}))
    assert not data.exists()  # none of these started or wrote anything

    data.write_text("a file where the data dir should be")
    for command in ("up", "credentials"):  # any command that reads the volume
        line = one_line(up(env, command))
        assert "APPLIANCE_DATA_DIR" in line and "is a file" in line


def test_read_only_data_dir_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    with tmpfs(data, "size=1m,ro"):
        line = one_line(up(appliance_env(data)))
        assert "APPLIANCE_DATA_DIR" in line and "not writable" in line


# --- finding 8: credentials, memo, full disk ----------------------------------------------------
def backend_urls(appliance) -> list[str]:
    settings = load_settings(appliance.env)
    return [settings.sam_base_url, settings.predict_base_url]


def basic(user: bytes, password: bytes) -> str:
    return "Basic " + base64.b64encode(user + b":" + password).decode()


def test_non_ascii_credentials_get_401_not_500(appliance):
    secret = appliance.secrets()["APPLIANCE_BACKEND_SECRET"].encode()
    wrong = [basic("labelstudio".encode(), "pässwörd".encode()), basic("läbelstudio".encode(), secret),
             basic(b"labelstudio", secret + "é".encode("latin-1")), "Basic bGFiZWzDqQ==\u00e9", "Basic \u00ff\u00fe"]
    for url in backend_urls(appliance):
        for header in wrong:
            response = requests.get(f"{url}/health", headers={"Authorization": header.encode("latin-1")}, timeout=5)
            assert response.status_code == 401, (url, header, response.status_code, response.text)
        right = requests.get(f"{url}/health", headers={"Authorization": basic(b"labelstudio", secret)}, timeout=5)
        assert right.status_code == 200


def test_url_memo_is_bounded_and_keeps_no_copy_of_the_url():
    memo = UrlMemo(capacity=3, ttl_seconds=60)
    big = "data:image/png;base64," + "A" * 2_000_000
    for i in range(5):
        memo.put(f"{big}#{i}", f"key{i}")
    assert memo.stats()["entries"] == 3 and memo.stats()["capacity"] == 3 and memo.stats()["bytes"] < 200
    assert memo.get(f"{big}#0") is None and memo.get(f"{big}#4") == "key4"
    assert all(len(digest) == 16 for digest in memo._entries)  # a digest, not the 2 MB URL
    memo.get(f"{big}#2")  # used: kept over the older #3
    memo.put("http://x/new", "new")
    assert memo.get(f"{big}#2") == "key2" and memo.get(f"{big}#3") is None
    expiring = UrlMemo(capacity=3, ttl_seconds=0)
    expiring.put("u", "k")
    assert expiring.get("u") is None and expiring.stats()["entries"] == 0


def test_sam_does_not_hold_big_data_uris(appliance):
    """The issue's case: distinct 2 MiB data: URIs (here all the same picture, so one embedding) used to stay in
    the memo, about 4 MB each, for good. Now it holds a digest and a content key per URL. (SAM's RSS is no measure:
    the allocator keeps some of every request's garbage.)"""
    from test_sam_service import keypoint

    appliance.wait_backend_ready("sam")
    url = backend_urls(appliance)[0]
    auth = appliance.backend_auth
    config = appliance.api("GET", f"/api/projects/{appliance.state()['project_id']}").json()["label_config"]
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(noise, (3, 1, 1))).save(buffer, format="PNG")  # noise does not compress: 2.3 MB
    payload = base64.b64encode(buffer.getvalue()).decode()
    assert len(payload) > 2 * 1024 * 1024
    before = requests.get(f"{url}/health", auth=auth, timeout=5).json()["url_memo"]
    for i in range(6):
        body = {"tasks": [{"id": 900000 + i, "data": {"image": f"data:image/png;n={i};base64,{payload}"}}],
                "label_config": config, "params": {"context": {"result": [keypoint(100, 100)]}}}
        response = requests.post(f"{url}/predict", json=body, auth=auth, timeout=120)
        assert response.status_code == 200 and response.json()["results"][0]["result"], response.text[:300]
    memo = requests.get(f"{url}/health", auth=auth, timeout=5).json()["url_memo"]
    added = memo["entries"] - before["entries"]
    assert added >= 6 and memo["entries"] <= memo["capacity"]
    assert memo["bytes"] - before["bytes"] < added * 200, memo  # not 6 x 3 MB


def test_trainer_survives_a_full_disk(appliance, tmp_path, artifacts):
    """The real trainer process on a data dir whose trainer folder is a full tmpfs, talking to the session's
    Label Studio: it reports the full disk, keeps running, writes its status once there is room again and
    tries the failed run again."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("secrets.env", "state.json"):
        shutil.copy2(appliance.data_dir / name, data / name)
    trainer = data / "trainer"
    log_path = artifacts / "trainer-full-disk.log"
    with tmpfs(trainer, "size=256k"):
        (trainer / "requests").mkdir()
        (trainer / "requests" / "1.json").write_text("")  # empty: removing it frees no room on the disk
        filler = fill(trainer)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "trainer"], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, env={**appliance.env, "APPLIANCE_DATA_DIR": str(data)})
        try:
            wait_for(lambda: "No space left on device" in log_path.read_text() and "failed" in log_path.read_text(),
                     90, log_path)
            time.sleep(7)  # another tick or two on the full disk
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert not (trainer / "status.json").exists()
            filler.unlink()
            status = trainer / "status.json"
            wait_for(lambda: status.exists() and "No space left" in str(json.loads(status.read_text()).get("error")),
                     30, log_path)
            assert "trying again in" in json.loads(status.read_text())["error"]
            wait_for(lambda: "retry after a full disk" in log_path.read_text(), 60, log_path)
            assert proc.poll() is None
            assert "Traceback" not in log_path.read_text()
        finally:
            proc.terminate()
            proc.wait(30)


def wait_for(condition, timeout: float, log_path: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)


def test_cuda_asked_for_but_unusable_stops_start_up_with_one_line(tmp_path):
    import torch

    from appliance import gpu

    if torch.cuda.is_available():  # a GPU machine: the same setting must start (checked by the GPU benchmark)
        gpu.require_cuda()
        return
    data = tmp_path / "data"
    line = one_line(up({**appliance_env(data), "APPLIANCE_DEVICE": "cuda"}))
    assert line.startswith("configuration error: APPLIANCE_DEVICE=cuda but ") and gpu.report()["why"] in line
    assert not data.exists()


def test_gpu_readiness_says_why_a_gpu_is_not_used(tmp_path, monkeypatch):
    from appliance import gpu

    proc_file = tmp_path / "version"  # the kernel module's own line, as /proc/driver/nvidia/version has it
    proc_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 09:35:42 UTC 2024\n"
                         "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
    monkeypatch.setattr(gpu, "DRIVER_FILE", proc_file)
    assert gpu.driver_version() == "550.90.07" and gpu.gpu_visible()
    info = {"torch": "2.14.1+cu130", "cuda_build": "13.0", "driver": gpu.driver_version(), "visible": True,
            "usable": False, "device": "cpu"}
    info["why"] = gpu._why_not(info, [])
    assert info["why"] == "NVIDIA driver 550.90.07 is too old for torch's CUDA 13.0 build: install driver 580 or newer"
    assert gpu.summary(info).endswith("GPU not used: " + info["why"])
    info.update(driver="580.65.06")
    assert "CUDA is unusable: cudaGetDeviceCount" in gpu._why_not(info, ["cudaGetDeviceCount failed\nmore"])
    assert gpu._why_not({**info, "cuda_build": None}, []) == "this torch (2.14.1+cu130) is a CPU-only build"


def test_training_sizes_default_by_device_and_bad_sizes_are_refused():
    import torch

    from appliance.trainer.job import device_defaults

    assert device_defaults("cpu", 0, 0) == (320, 4)
    assert device_defaults("cuda", 0, 0) == (640, 16)  # a GPU takes RTMDet's own size and bigger batches
    assert device_defaults("auto", 0, 0) == ((640, 16) if torch.cuda.is_available() else (320, 4))
    assert device_defaults("cuda", 192, 2) == (192, 2)  # what the admin sets wins
    settings = load_settings({})
    assert settings.train_img_size == 0 and settings.train_batch == 0
    with pytest.raises(ConfigError) as caught:
        load_settings({"APPLIANCE_TRAIN_IMG_SIZE": "32"})
    assert "APPLIANCE_TRAIN_IMG_SIZE" in caught.value.line and "at least 64" in caught.value.line


def test_status_of_a_stopped_appliance_exits_1_and_says_what_the_trainer_waits_for(tmp_path):
    env = appliance_env(tmp_path / "data", APPLIANCE_TRAIN_MIN_NEW="7")
    done = up(env, "status")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "supervisord is not running" in done.stdout and "Trainer:\n  not started" in done.stdout, done.stdout
    (tmp_path / "data" / "trainer").mkdir(parents=True)
    (tmp_path / "data" / "trainer" / "status.json").write_text(json.dumps({"state": "idle", "pending_changes": 3}))
    shown = up(env, "status").stdout.split("Trainer:")[-1]
    assert "idle: 3 new annotation(s); the next run starts after 4 more, or 600 s after the last one" in shown, shown
