"""The Dockerfile and the native install share one source of truth: these checks fail when they drift."""

from __future__ import annotations

import re
import tomllib

from appliance.settings import load_settings
from harness import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTALL = (ROOT / "scripts" / "install.sh").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def locked(path: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_both_paths_run_the_same_install_script():
    assert re.search(r"^RUN scripts/install\.sh /opt/appliance$", DOCKERFILE, re.M)
    assert "scripts/install.sh $(abspath $(VENV))" in MAKEFILE


def test_everything_the_install_reads_is_copied_into_the_image():
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M)
    sources = {part for line in copied for part in line.split()}
    for needed in ("pyproject.toml", "README.md", "requirements", "scripts", "appliance"):
        assert needed in sources, f"Dockerfile does not COPY {needed}"
    for path in re.findall(r"\$root/([\w/-][\w./-]*)", INSTALL):
        assert path.split("/")[0] in sources, f"install.sh reads {path}, which the image does not copy"


def test_every_dependency_is_pinned_for_both():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    app = locked("requirements/app.lock")
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
    for dep in deps:
        name = re.split(r"[<>=\[ ;]", dep)[0].lower().replace("_", "-")
        assert name in app, f"{name} is not pinned in requirements/app.lock"
    assert app["torch"] == "2.14.1" and app["torchvision"] == "0.29.1"
    assert "opencv-python" not in app  # headless only: see install.sh
    studio = locked("requirements/studio.lock")
    assert studio["label-studio"] == "1.23.2" and "gunicorn" in studio


def test_entrypoint_port_volume_user_and_healthcheck_match_the_settings():
    assert re.search(r'^ENTRYPOINT \[.*"appliance", "up"\]$', DOCKERFILE, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["appliance"] == "appliance.cli:main"
    port = load_settings({}).port
    assert re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.M) == [str(port)]  # only the UI port
    # The HEALTHCHECK follows APPLIANCE_PORT when a user moves the UI, and defaults to the settings' port.
    assert f'"http://127.0.0.1:${{APPLIANCE_PORT:-{port}}}/health"' in DOCKERFILE
    assert re.search(r"^VOLUME /data$", DOCKERFILE, re.M) and "APPLIANCE_DATA_DIR=/data" in DOCKERFILE
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^STOPSIGNAL SIGTERM$", DOCKERFILE, re.M)


def test_baked_weights_reach_the_settings_by_their_variables():
    for variable in ("APPLIANCE_SAM_CHECKPOINT", "APPLIANCE_SAM_MODEL_TYPE", "APPLIANCE_DETECTOR_WEIGHTS"):
        assert variable in DOCKERFILE
    # Without build arguments the image sets the paths empty: the settings read that as unset.
    settings = load_settings({"APPLIANCE_SAM_CHECKPOINT": "", "APPLIANCE_DETECTOR_WEIGHTS": ""})
    assert settings.sam_checkpoint is None and settings.detector_weights is None
