"""deploy/kubernetes/*.yaml and deploy/compose.yaml: validated by real validators from PyPI (kubernetes-validate,
with the Kubernetes API's own schemas; check-jsonschema, with the compose specification's schema), then read for
what the schemas cannot know: the roles split as the README says, GPUs where they matter, probes on /health,
secrets only from Secrets, and no setting the appliance does not have."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.settings import ROLES, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
COMPOSE = ROOT / "deploy" / "compose.yaml"
EXAMPLE_ENV = ROOT / "deploy" / "appliance.env.example"
BIN = Path(sys.executable).parent
SECRETS = {"LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD", "APPLIANCE_SECRET_KEY", "APPLIANCE_BACKEND_SECRET",
           "APPLIANCE_DATABASE_URL", "APPLIANCE_GCS_CREDENTIALS_JSON"}


def settings_names() -> set[str]:
    return {name for field in Settings.model_fields.values() for name in getattr(field.validation_alias, "choices", [])}


def documents() -> list[dict]:
    return [doc for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Deployment"}


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict) -> dict[str, str]:
    config = next(d for d in documents() if d["kind"] == "ConfigMap")["data"]
    return {**config, **{e["name"]: e.get("value", "") for e in container(deployment).get("env", [])}}


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    assert KUBERNETES, "no manifests in deploy/kubernetes"
    run = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *map(str, KUBERNETES)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" passed for resource ") == len(documents())


def test_a_broken_manifest_is_caught_by_the_validator(tmp_path):
    broken = tmp_path / "broken.yaml"
    text = (ROOT / "deploy" / "kubernetes" / "trainer.yaml").read_text()
    broken.write_text(text.replace("replicas: 1", "replicas: one"))
    run = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(broken)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "replicas" in run.stdout + run.stderr


def test_compose_file_passes_the_compose_specification():
    run = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_roles_run_apart_with_gpus_where_they_matter():
    found = deployments()
    roles = {name: env_of(d)["APPLIANCE_ROLES"] for name, d in found.items()}
    assert roles == {"studio": "studio", "sam": "sam", "predict": "predict", "trainer": "train"}
    assert set(roles.values()) == set(ROLES)
    assert found["studio"]["spec"]["replicas"] >= 2 and found["sam"]["spec"]["replicas"] >= 2
    assert found["trainer"]["spec"]["replicas"] == 1 and found["trainer"]["spec"]["strategy"]["type"] == "Recreate"
    for name in ("sam", "trainer"):
        assert container(found[name])["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env_of(found[name])["APPLIANCE_DEVICE"] == "cuda"  # no silent CPU fallback on a GPU node
    services = {d["metadata"]["name"]: d["spec"]["ports"][0]["port"] for d in documents() if d["kind"] == "Service"}
    config = env_of(found["studio"])
    assert services == {"studio": 8080, "sam": 9090, "predict": 9091}
    assert config["LABEL_STUDIO_URL"] == "" and env_of(found["sam"])["LABEL_STUDIO_URL"] == "http://studio:8080"
    assert config["APPLIANCE_SAM_URL"] == "http://sam:9090" and config["APPLIANCE_PREDICT_URL"] == "http://predict:9091"
    assert config["APPLIANCE_SHARED_STATE"].startswith("gs://")


def test_probes_ask_each_role_its_health():
    found = deployments()
    studio = container(found["studio"])
    assert studio["readinessProbe"]["httpGet"]["path"] == "/health" == studio["livenessProbe"]["httpGet"]["path"]
    for name, port in (("sam", 9090), ("predict", 9091)):
        for probe in ("readinessProbe", "livenessProbe"):
            command = " ".join(container(found[name])[probe]["exec"]["command"])
            assert f"http://127.0.0.1:{port}/health" in command and "$APPLIANCE_BACKEND_SECRET" in command
    assert container(found["trainer"])["livenessProbe"]["exec"]["command"] == ["appliance", "status"]


def test_secrets_come_from_a_secret_and_every_name_is_a_setting():
    known = settings_names()
    config = next(d for d in documents() if d["kind"] == "ConfigMap")["data"]
    assert not SECRETS & set(config), "secrets belong in the Secret, not the ConfigMap"
    for name, deployment in deployments().items():
        refs = container(deployment)["envFrom"]
        assert {"secretRef": {"name": "appliance-secrets"}} in refs, name
        assert set(env_of(deployment)) <= known, set(env_of(deployment)) - known
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("studio", "sam", "predict", "trainer"):
        assert set(compose["services"][name]["environment"]) <= known
    # Label Studio admits the backends' addresses as resolved at its start: they must exist by then.
    assert {"postgres", "sam", "predict"} <= set(compose["services"]["studio"]["depends_on"])
    example = dict(line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) <= known and SECRETS - {"APPLIANCE_GCS_CREDENTIALS_JSON"} <= set(example)


def test_the_examples_placeholders_never_start_an_appliance(tmp_path):
    example = dict(line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines()
                   if line and not line.startswith("#"))
    with pytest.raises(ConfigError) as caught:
        load_settings({**example, "APPLIANCE_DATA_DIR": str(tmp_path)})
    assert "CHANGE-ME" in caught.value.line and caught.value.line.split()[2] in example


def test_the_trainers_liveness_command_fails_when_a_program_gave_up():
    from appliance.status import down

    running = [{"name": "train", "state": "RUNNING", "pid": 7, "uptime": "1:00"},
               {"name": "bootstrap", "state": "EXITED", "pid": 0, "uptime": ""}]
    assert not down({"processes": running})
    fatal = {"name": "sam", "state": "FATAL", "pid": 0, "uptime": "Exited too quickly"}
    assert down({"processes": [*running[:1], fatal]})
    assert down({"processes": "supervisord is not running (no socket at /data/run/supervisor.sock)"})
