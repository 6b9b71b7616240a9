"""deploy/startup.sh: shellcheck-clean, and its dry run prints the right actions without touching anything.

Every run here is a dry run on a PATH whose system-changing commands (apt-get, curl, mount, systemctl, ...)
are stubs that record any call and fail: a test fails if the script ever runs one. Nothing needs Docker,
a GPU, GCE or the network; the whole file takes about a second.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "startup.sh"
BASH = shutil.which("bash") or "/bin/bash"
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# Commands that change the system or reach the network. Tools the script probes with `command -v`
# (docker, gpg, nvidia-ctk) are stubbed only where a test says so, since a stub makes them "installed".
GUARDED = ["apt-get", "apt", "curl", "wget", "mkfs.ext4", "mkfs", "mount", "umount", "systemctl",
           "modprobe", "reboot", "shutdown", "ubuntu-drivers", "udevadm"]

SECRET_JSON = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----TOPSECRET-KEY-MATERIAL"}'
SECRET_B64 = base64.b64encode(SECRET_JSON.encode()).decode()


def _stub_dir(tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    bindir, calls = tmp_path / "stubs", tmp_path / "stub-calls.log"
    bindir.mkdir(exist_ok=True)
    for name in [*GUARDED, *extra]:
        stub = bindir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
        stub.chmod(0o755)
    return bindir, calls


def dry_run(tmp_path: Path, *args: str, stubs: tuple[str, ...] = (), stdin: str | None = None,
            argv: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run the script in dry-run mode with a clean environment; assert no guarded command ran."""
    bindir, calls = _stub_dir(tmp_path, stubs)
    full_env = {
        "PATH": f"{bindir}:{SYSTEM_PATH}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATA_DIR": str(tmp_path / "data"),
        "ON_GCE": "0",
        "FORCE_GPU": "0",
        "DRY_RUN": "1",
    }
    full_env.update(env)
    cmd = argv if argv is not None else [BASH, str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=full_env, input=stdin, capture_output=True, text=True, timeout=60)
    recorded = calls.read_text() if calls.exists() else ""
    assert recorded == "", f"a dry run executed system commands:\n{recorded}"
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def actions(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def docker_run_line(proc: subprocess.CompletedProcess) -> str:
    lines = [a for a in actions(proc) if a.startswith("docker run ")]
    assert len(lines) == 1, output(proc)
    return lines[0]


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("the `shellcheck` binary is not installed: `apt-get install -y shellcheck` (Debian/Ubuntu)")
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(SCRIPT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help():
    proc = subprocess.run([BASH, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30,
                          env={"PATH": SYSTEM_PATH})
    assert proc.returncode == 0, proc.stderr
    for word in ("Usage:", "IMAGE", "PLACEHOLDER", "DATA_DISK", "DATA_DIR", "FORCE_GPU", "--dry-run",
                 "GOOGLE_APPLICATION_CREDENTIALS_BASE64", "appliance credentials"):
        assert word in proc.stdout


def test_unknown_argument_is_refused(tmp_path):
    proc = dry_run(tmp_path, "--bogus")
    assert proc.returncode == 2
    assert "unknown argument: --bogus" in proc.stderr


def test_cpu_dry_run(tmp_path):
    proc = dry_run(tmp_path, "--dry-run", DRY_RUN="")
    assert proc.returncode == 0, output(proc)
    text = proc.stdout
    assert "install -y -q docker.io" in text or \
        "Docker already installed" in text
    data = str(tmp_path / "data")
    assert f"+ mkdir -p {data}" in text
    assert f"+ chown 1000:1000 {data}" in text
    assert f"+ install -m 0600 -o root -g root /dev/stdin {data}/appliance.env" in text
    assert "+ docker pull ghcr.io/OWNER/labeling-appliance:latest" in text
    assert "+ docker rm -f labeling-appliance" in text
    run_line = docker_run_line(proc)
    for part in ("--name labeling-appliance", "--restart unless-stopped", "-p 8080:8080", f"-v {data}:/data",
                 f"--env-file {data}/appliance.env"):
        assert part in run_line
    assert run_line.endswith(" ghcr.io/OWNER/labeling-appliance:latest")
    assert "--gpus" not in run_line
    assert "nvidia" not in text
    assert "placeholder" in proc.stderr  # the default IMAGE is flagged, and refused outside a dry run
    assert "sudo docker exec labeling-appliance appliance credentials" in text
    assert f"{data}/secrets.env" in text
    assert not (tmp_path / "data").exists()  # nothing was created


def test_docker_present_is_not_reinstalled(tmp_path):
    proc = dry_run(tmp_path, stubs=("docker",))
    assert proc.returncode == 0, output(proc)
    assert "Docker already installed" in proc.stdout
    assert "docker.io" not in proc.stdout


def test_port_and_image_are_variables(tmp_path):
    proc = dry_run(tmp_path, PORT="9000", BIND_ADDRESS="127.0.0.1", IMAGE="registry.example/team/app:1.2")
    assert proc.returncode == 0, output(proc)
    run_line = docker_run_line(proc)
    assert "-p 127.0.0.1:9000:8080" in run_line
    assert run_line.endswith(" registry.example/team/app:1.2")
    assert "placeholder" not in proc.stderr


def test_gpu_dry_run(tmp_path):
    proc = dry_run(tmp_path, FORCE_GPU="1")
    assert proc.returncode == 0, output(proc)
    text = proc.stdout
    if shutil.which("nvidia-ctk", path=SYSTEM_PATH) is None:
        assert "https://nvidia.github.io/libnvidia-container/gpgkey" in text
        assert "+ install -m 0644" in text and "/etc/apt/sources.list.d/nvidia-container-toolkit.list" in text
        assert "install -y -q nvidia-container-toolkit" in text
    assert "+ nvidia-ctk runtime configure --runtime=docker" in text
    assert "+ systemctl restart docker" in text
    assert "--gpus all" in docker_run_line(proc)


def test_no_gpu_means_no_toolkit(tmp_path):
    proc = dry_run(tmp_path, FORCE_GPU="0")
    assert proc.returncode == 0, output(proc)
    assert "nvidia-container-toolkit" not in proc.stdout
    assert "--gpus" not in docker_run_line(proc)


def test_data_disk_dry_run(tmp_path):
    disk = "/dev/disk/by-id/google-labeling-data-test-does-not-exist"
    data = str(tmp_path / "data")
    proc = dry_run(tmp_path, DATA_DISK=disk)
    assert proc.returncode == 0, output(proc)
    text = proc.stdout
    # The format is shown with its guard: only a disk with neither a filesystem nor a partition table.
    assert "formatted only if 'blkid -p' finds neither a filesystem nor a partition table" in text
    mkfs = [a for a in actions(proc) if a.startswith("mkfs.ext4 ")]
    assert mkfs and mkfs[0].endswith(disk)
    fstab = f"UUID=<UUID of {disk}> {data} ext4 discard,defaults,nofail,x-systemd.before=docker.service 0 2"
    assert f"+ echo '{fstab}' >> /etc/fstab" in text
    assert f"+ mount {data}" in text
    assert f"+ chown 1000:1000 {data}" in text
    # The mount comes before anything is written into the data directory.
    lines = text.splitlines()
    assert lines.index(f"+ mount {data}") < next(i for i, line in enumerate(lines) if "appliance.env" in line)


def test_no_data_disk_means_no_mkfs_nor_fstab(tmp_path):
    proc = dry_run(tmp_path)
    assert "mkfs" not in proc.stdout
    assert "/etc/fstab" not in proc.stdout


def test_service_account_key_is_written_but_never_shown(tmp_path):
    data = str(tmp_path / "data")
    proc = dry_run(tmp_path, GOOGLE_APPLICATION_CREDENTIALS_BASE64=SECRET_B64)
    assert proc.returncode == 0, output(proc)
    text = output(proc)
    assert f"+ install -m 0600 -o 1000 -g 1000 /dev/stdin {data}/gcp-key.json" in text
    run_line = docker_run_line(proc)
    assert f"-v {data}/gcp-key.json:/run/secrets/gcp-key.json:ro" in run_line
    assert "-e GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/gcp-key.json" in run_line
    assert SECRET_B64 not in text
    assert SECRET_B64[:24] not in text
    assert "TOPSECRET" not in text
    assert "PRIVATE KEY" not in text
    assert not (tmp_path / "data").exists()


def test_invalid_key_base64_fails_without_echoing_it(tmp_path):
    proc = dry_run(tmp_path, GOOGLE_APPLICATION_CREDENTIALS_BASE64="not*base64!!secretish")
    assert proc.returncode != 0
    assert "not valid base64" in proc.stderr
    assert "secretish" not in output(proc)


def test_settings_go_to_the_env_file_by_name_only(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "appliance.env").write_text("APPLIANCE_PROJECT_TITLE=Kept from last time\n")
    proc = dry_run(tmp_path, LABEL_STUDIO_PASSWORD="Hunter2-very-secret", APPLIANCE_LABELS="Cat,Dog",
                   APPLIANCE_PORT="9999", UNRELATED_VARIABLE="x")
    assert proc.returncode == 0, output(proc)
    text = output(proc)
    env_line = next(line for line in proc.stdout.splitlines()
                    if line.startswith("==> writing") and "appliance.env" in line)
    for key in ("APPLIANCE_PROJECT_TITLE", "LABEL_STUDIO_PASSWORD", "APPLIANCE_LABELS"):
        assert key in env_line
    assert "UNRELATED_VARIABLE" not in env_line
    assert "APPLIANCE_PORT" not in env_line and "APPLIANCE_PORT is set by this script" in proc.stderr
    assert "Hunter2-very-secret" not in text
    assert "Cat,Dog" not in text
    assert (data / "appliance.env").read_text() == "APPLIANCE_PROJECT_TITLE=Kept from last time\n"


def test_gce_dry_run_reads_no_metadata(tmp_path):
    proc = dry_run(tmp_path, ON_GCE="1", IMAGE="europe-docker.pkg.dev/proj/repo/labeling-appliance:1")
    assert proc.returncode == 0, output(proc)
    text = proc.stdout
    assert "would read GCE metadata attribute GOOGLE_APPLICATION_CREDENTIALS_BASE64 (not read)" in text
    assert "would read GCE metadata attributes" in text and "APPLIANCE_LABELS" in text
    # Artifact Registry: logs in with the VM's token on stdin, never in argv or output.
    assert "+ docker login --username oauth2accesstoken --password-stdin https://europe-docker.pkg.dev" in text
    assert "firewall" in text


def test_piped_into_bash_as_an_unprivileged_user(tmp_path):
    """`curl ... | bash -s -- --dry-run`: works from stdin, and needs no root."""
    script = SCRIPT.read_text()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop privileges")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", BASH, "-s", "--", "--dry-run"]
    else:
        argv = [BASH, "-s", "--", "--dry-run"]
    proc = dry_run(tmp_path, argv=argv, stdin=script, DRY_RUN="", DATA_DIR="/nonexistent/labeling-data",
                   HOME="/nonexistent", FORCE_GPU="1", DATA_DISK="/dev/disk/by-id/google-labeling-data")
    assert proc.returncode == 0, output(proc)
    assert "--gpus all" in docker_run_line(proc)
    assert "Labeling appliance: http://" in proc.stdout  # the script ran to its end


def test_real_run_needs_root(tmp_path):
    """Without --dry-run and without root the script stops before doing anything (never run as root here)."""
    argv = [BASH, "-s"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a real (non-dry) run is never started by the tests")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    bindir, calls = _stub_dir(tmp_path)
    proc = subprocess.run(argv, input=SCRIPT.read_text(), capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bindir}:{SYSTEM_PATH}", "HOME": "/nonexistent", "ON_GCE": "0"})
    assert proc.returncode != 0
    assert "run as root" in proc.stderr
    assert not calls.exists()
