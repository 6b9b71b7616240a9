"""Configuration: every wrong value stops start-up with one line naming the variable, before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.settings import ConfigError, load_settings
from harness import ROOT, appliance_env

BAD = [
    ("APPLIANCE_PORT", "eighty"), ("APPLIANCE_PORT", "0"), ("APPLIANCE_PORT", "70000"), ("APPLIANCE_PORT", "-1"),
    ("APPLIANCE_SAM_PORT", "x"), ("APPLIANCE_PREDICT_PORT", "99999"), ("APPLIANCE_STUDIO_WORKERS", "0"),
    ("APPLIANCE_STUDIO_WORKERS", "many"), ("APPLIANCE_BACKEND_THREADS", "0"), ("APPLIANCE_TORCH_THREADS", "-2"),
    ("APPLIANCE_LOG_LEVEL", "LOUD"), ("APPLIANCE_ROLES", "studio,frontend"), ("APPLIANCE_ROLES", ","),
    ("APPLIANCE_LABELS", " , "), ("APPLIANCE_LABELS", "Cat,Cat"), ("LABEL_STUDIO_USERNAME", "admin"),
    ("LABEL_STUDIO_USERNAME", "@x"), ("LABEL_STUDIO_PASSWORD", "short"), ("LABEL_STUDIO_API_KEY", "x" * 41),
    ("LABEL_STUDIO_API_KEY", "abc"), ("LABEL_STUDIO_USER_TOKEN", "y" * 50), ("APPLIANCE_BACKEND_SECRET", "tiny"),
    ("APPLIANCE_DATABASE_URL", "mysql://u:p@h/db"), ("APPLIANCE_DATABASE_URL", "postgresql://"),
    ("APPLIANCE_DATABASE_URL", "postgresql://host-only"), ("LABEL_STUDIO_URL", "localhost:8080"),
    ("APPLIANCE_SAM_URL", "ftp://x"), ("APPLIANCE_PREDICT_URL", "http://"), ("APPLIANCE_READY_TIMEOUT", "0"),
    ("APPLIANCE_READY_TIMEOUT", "soon"), ("APPLIANCE_SAMPLE_IMAGES", "perhaps"), ("APPLIANCE_PROJECT_TITLE", "ab"),
    ("APPLIANCE_PROJECT_TITLE", "t" * 51),
]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    line = caught.value.line
    assert name in line and "\n" not in line and caught.value.code == 2
    if "KEY" in name or "PASSWORD" in name or "SECRET" in name or "TOKEN" in name:
        assert value not in line  # a wrong secret is still a secret


def test_defaults_serve_the_offline_demo():
    settings = load_settings({})
    assert settings.port == 8080 and settings.roles == ["studio", "sam", "predict", "train"]
    assert settings.labels == ["Person", "Animal", "Vehicle", "Object"]
    assert settings.password is None and settings.api_key is None  # generated at boot, never defaulted


def test_the_process_environment_is_read_by_prefix_and_lists_by_commas(monkeypatch):
    monkeypatch.setenv("APPLIANCE_LABELS", " Cat, Dog ,")
    monkeypatch.setenv("APPLIANCE_ROLES", "sam,predict")
    monkeypatch.setenv("APPLIANCE_SAM_ENCODER_THREADS", "3")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://studio.internal:8080/")
    monkeypatch.setenv("APPLIANCE_ALLOWED_IMAGE_HOSTS", "a.example,b.example")
    settings = load_settings()
    assert settings.labels == ["Cat", "Dog"] and settings.roles == ["sam", "predict"]
    assert settings.sam_encoder_threads == 3 and settings.studio_base_url == "http://studio.internal:8080"
    assert settings.allowed_image_hosts == ["a.example", "b.example"]
    monkeypatch.setenv("APPLIANCE_ROLES", "sam,gpu")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.line.startswith("configuration error: APPLIANCE_ROLES") and "gpu" in caught.value.line


def test_token_alias_is_accepted():
    assert load_settings({"LABEL_STUDIO_USER_TOKEN": "a" * 40}).api_key.get_secret_value() == "a" * 40


def _refused_line(tmp_path, **variables) -> str:
    """`appliance up` with ``variables``: it must exit 2 with one line, having started and written nothing."""
    env = appliance_env(tmp_path / "data", **variables)
    proc = subprocess.run([sys.executable, "-m", "appliance", "up"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert not (tmp_path / "data").exists()  # nothing was started or written
    return lines[0]


@pytest.mark.parametrize("name,value", [("APPLIANCE_PORT", "eighty"), ("LABEL_STUDIO_API_KEY", "z" * 45),
                                        ("LABEL_STUDIO_USER_TOKEN", "y" * 60)])
def test_entrypoint_exits_with_one_line(tmp_path, name, value):
    line = _refused_line(tmp_path, **{name: value})
    assert name in line
    if name != "APPLIANCE_PORT":
        assert value not in line  # a secret
    if name == "LABEL_STUDIO_USER_TOKEN":  # the variable the user set, not its other spelling
        assert "LABEL_STUDIO_API_KEY" not in line


def _write(path, content) -> str:
    import torch

    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


@pytest.mark.parametrize("case,expected", [
    ("missing", "no file at"), ("empty", "is empty"), ("junk", "not a PyTorch checkpoint"),
    ("detector", "not a Segment Anything state dict"), ("other-type", "holds SAM vit_t, but APPLIANCE_SAM_MODEL_TYPE"),
])
def test_a_sam_checkpoint_that_cannot_load_is_refused_before_start(tmp_path, case, expected):
    import torch

    from appliance.models.sam.weights import mobile_sam_path

    variables = {}
    if case == "missing":
        variables["APPLIANCE_SAM_CHECKPOINT"] = str(tmp_path / "nonexistent" / "sam.pth")
    elif case == "other-type":  # real MobileSAM weights declared as vit_b
        variables.update(APPLIANCE_SAM_CHECKPOINT=str(mobile_sam_path()), APPLIANCE_SAM_MODEL_TYPE="vit_b")
    else:
        content = {"empty": b"", "junk": b"not a checkpoint at all" * 10,
                   "detector": {"backbone.stem.weight": torch.zeros(2)}}[case]
        variables["APPLIANCE_SAM_CHECKPOINT"] = _write(tmp_path / "sam.pth", content)
    line = _refused_line(tmp_path, **variables)
    assert line.startswith("configuration error: APPLIANCE_SAM_CHECKPOINT: ") and expected in line, line


@pytest.mark.parametrize("case,expected", [("missing", "no file at"), ("junk", "not a PyTorch checkpoint"),
                                           ("no-tensors", "no state dict of tensors"),
                                           ("sam", "not a detector's state dict")])
def test_detector_weights_that_cannot_load_are_refused_before_start(tmp_path, case, expected):
    import torch

    path = tmp_path / "detector.pth"
    if case != "missing":
        _write(path, {"junk": b"\x80\x02 truncated", "no-tensors": {"meta": {"epoch": 3}},
                      "sam": {"image_encoder.x": torch.zeros(1)}}[case])
    line = _refused_line(tmp_path, APPLIANCE_DETECTOR_WEIGHTS=str(path))
    assert line.startswith("configuration error: APPLIANCE_DETECTOR_WEIGHTS: ") and expected in line, line


def test_a_real_sam_checkpoint_set_explicitly_passes_the_check():
    from appliance.models.sam.weights import inspect_checkpoint, mobile_sam_path

    inspect_checkpoint(mobile_sam_path(), "vit_t")  # raises WeightsError when refused


def test_busy_port_is_an_error_not_a_silent_hop(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = appliance_env(tmp_path / "data", APPLIANCE_PORT=str(busy.getsockname()[1]))
        proc = subprocess.run([sys.executable, "-m", "appliance", "up"], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "APPLIANCE_PORT" in proc.stderr and "already in use" in proc.stderr


def test_readme_env_table_is_the_one_appliance_config_prints():
    readme = (ROOT / "README.md").read_text()
    printed = subprocess.run([sys.executable, "-m", "appliance", "config"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
    section = readme.split("<!-- env-table:", 1)[1].split("-->", 1)[1].split("<!-- /env-table -->", 1)[0].strip()
    assert section == printed, "README env table differs from `appliance config`: paste its output between the markers"
    for name in ("APPLIANCE_DATA_DIR", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_USER_TOKEN",
                 "GOOGLE_APPLICATION_CREDENTIALS", "APPLIANCE_SAM_ENCODER_THREADS"):
        assert f"`{name}`" in section


