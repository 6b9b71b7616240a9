#!/usr/bin/env bash
# Labeling appliance: one-shot install / update on a fresh Debian or Ubuntu VM.
#
#   GCE:   gcloud compute instances create ... --metadata-from-file startup-script=deploy/startup.sh
#   other: curl -fsSL https://<where this repo is served>/deploy/startup.sh | sudo IMAGE=... bash
#   check: bash deploy/startup.sh --dry-run        (prints every action, changes nothing, needs no root)
#
# Installs Docker (and, on a GPU VM, the NVIDIA driver and container toolkit), prepares the data disk,
# writes the appliance's settings to <DATA_DIR>/appliance.env, then pulls IMAGE and (re)starts the
# container "labeling-appliance". Re-running it (every boot on GCE) pulls again and replaces the container;
# the data directory is never touched beyond mkdir/chown. See deploy/README.md and --help.
#
# Every command that changes the system goes through run(), which prints it as "+ cmd" and, with
# DRY_RUN=1 / --dry-run, stops there. Secret values (the service-account key, passwords, registry tokens)
# never appear in argv or in the output: only their names do.
#
# The whole script is one function called on its last line, so a truncated `curl | bash` download runs
# nothing, and every command's stdin is redirected so none can swallow the rest of a piped script.

set -euo pipefail

DEFAULT_IMAGE="ghcr.io/OWNER/labeling-appliance:latest"   # a placeholder: no such image is published
CONTAINER_NAME="labeling-appliance"
METADATA_URL="http://metadata.google.internal/computeMetadata/v1"
KEY_IN_CONTAINER="/run/secrets/gcp-key.json"
NVIDIA_KEYRING="/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
NVIDIA_REPO="https://nvidia.github.io/libnvidia-container"

# The settings of the container read from GCE metadata attributes (and from the environment): every
# documented variable except the three this script owns (APPLIANCE_DATA_DIR, APPLIANCE_PORT, APPLIANCE_HOST).
DEFAULT_METADATA_KEYS="APPLIANCE_ROLES APPLIANCE_LOG_LEVEL APPLIANCE_STUDIO_WORKERS APPLIANCE_DATABASE_URL
LABEL_STUDIO_URL LABEL_STUDIO_USERNAME LABEL_STUDIO_PASSWORD LABEL_STUDIO_API_KEY LABEL_STUDIO_USER_TOKEN
APPLIANCE_SECRET_KEY APPLIANCE_BACKEND_SECRET APPLIANCE_PROJECT_TITLE APPLIANCE_PROJECT_DESCRIPTION
APPLIANCE_LABELS APPLIANCE_METADATA_FIELDS APPLIANCE_LABEL_CONFIG_FILE APPLIANCE_LABEL_CONFIG
APPLIANCE_IMAGES_DIR APPLIANCE_SAMPLE_IMAGES APPLIANCE_BACKEND_THREADS APPLIANCE_TORCH_THREADS
APPLIANCE_READY_TIMEOUT APPLIANCE_DEVICE APPLIANCE_SAM_MODEL_TYPE APPLIANCE_SAM_CHECKPOINT
APPLIANCE_SAM_CACHE_MB APPLIANCE_SAM_PREFETCH APPLIANCE_SCORE_THRESHOLD APPLIANCE_PREDICT_BATCH
APPLIANCE_LABEL_MAP APPLIANCE_IMAGE_MAX_MB APPLIANCE_IMAGE_MAX_MEGAPIXELS APPLIANCE_ALLOWED_IMAGE_HOSTS
APPLIANCE_GCS_SOURCE_BUCKET APPLIANCE_GCS_SOURCE_PREFIX APPLIANCE_GCS_TARGET_BUCKET APPLIANCE_GCS_TARGET_PREFIX
APPLIANCE_SHARED_STATE APPLIANCE_SHARED_POLL_SECONDS APPLIANCE_TRAINER_LEASE_SECONDS"
MANAGED_KEYS=" APPLIANCE_DATA_DIR APPLIANCE_PORT APPLIANCE_HOST GOOGLE_APPLICATION_CREDENTIALS GOOGLE_APPLICATION_CREDENTIALS_BASE64 "

# The script's own settings: environment first, then (on GCE) the metadata attribute of the same name.
SCRIPT_KEYS="IMAGE PORT BIND_ADDRESS DATA_DIR DATA_DISK CONTAINER_UID FORCE_GPU INSTALL_NVIDIA_DRIVER
NVIDIA_DRIVER_PACKAGE AUTO_REBOOT HEALTH_TIMEOUT SHM_SIZE METADATA_KEYS REGISTRY_USERNAME REGISTRY_PASSWORD"

usage() {
  cat <<EOF
Usage: startup.sh [--dry-run] [--help]
       curl -fsSL <url>/deploy/startup.sh | sudo [VAR=value ...] bash [-s -- --dry-run]

Installs Docker (+ NVIDIA driver and container toolkit on a GPU VM), prepares the data directory, and
runs IMAGE as the container "$CONTAINER_NAME" (--restart unless-stopped). Re-run it to update: it pulls
IMAGE again and replaces the container; the data stays in DATA_DIR. On GCE, put it in the metadata key
"startup-script" and every variable below can also be an instance metadata attribute of the same name
(an environment variable wins over the attribute).

Variables:
  IMAGE                  image to run (default: $DEFAULT_IMAGE, a PLACEHOLDER:
                         publish the image somewhere and set IMAGE; the script refuses the placeholder)
  PORT                   host port published to the container's 8080 (default 8080)
  BIND_ADDRESS           host address to publish on, e.g. 127.0.0.1 behind a proxy/IAP (default: all)
  DATA_DIR               host directory mounted at /data (default /mnt/labeling-data)
  DATA_DISK              block device for DATA_DIR, e.g. /dev/disk/by-id/google-labeling-data; formatted
                         ext4 only when it has no filesystem and no partition table, mounted through
                         /etc/fstab by UUID with nofail. Unset: DATA_DIR is a directory on the boot disk
  CONTAINER_UID          owner of DATA_DIR, the image's non-root user (default 1000)
  FORCE_GPU              1: act as if an NVIDIA GPU were present, 0: as if none (default: detect)
  INSTALL_NVIDIA_DRIVER  0: never install the driver (e.g. an image that ships one) (default 1)
  NVIDIA_DRIVER_PACKAGE  apt package(s) to install as the driver instead of the distribution's choice
                         (e.g. nvidia-driver-580-server on Ubuntu; 580 or newer: the image's CUDA 13 build)
  AUTO_REBOOT            1: reboot once when a fresh driver needs it, 0: never (default: 1 on GCE,
                         where the startup script runs again after the reboot; 0 elsewhere)
  HEALTH_TIMEOUT         seconds to wait for the container to be healthy (default 600)
  SHM_SIZE               /dev/shm size of the container (default 1g)
  METADATA_KEYS          container settings read from GCE metadata (default: every documented
                         APPLIANCE_* / LABEL_STUDIO_* variable)
  APPLIANCE_*, LABEL_STUDIO_*
                         container settings (see the repository README); given in the environment or as
                         metadata attributes they are merged into DATA_DIR/appliance.env (0600, root);
                         values already in that file are kept unless given again
  GOOGLE_APPLICATION_CREDENTIALS_BASE64
                         a service-account JSON key, base64-encoded; written to DATA_DIR/gcp-key.json
                         (0600), mounted read-only at $KEY_IN_CONTAINER, GOOGLE_APPLICATION_CREDENTIALS
                         points at it. Not needed on GCE when the VM's own service account will do
  REGISTRY_USERNAME, REGISTRY_PASSWORD
                         docker login for a private registry (on GCE, Artifact Registry and gcr.io
                         images log in with the VM's service account by themselves)
  DRY_RUN=1 / --dry-run  print every action as "+ command" and change nothing (no root, no network)

Admin credentials after start: sudo docker exec $CONTAINER_NAME appliance credentials
(or the file DATA_DIR/secrets.env, mode 0600). The password is never printed by this script.
EOF
}

# --- output and the run() wrapper ------------------------------------------------------------------

log() { printf '==> %s\n' "$*"; }
note() { printf '# %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

quote_cmd() {
  local out="" arg safe='^[A-Za-z0-9_./:=,@%+-]+$' q="'"
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then out+=" $arg"; else out+=" '${arg//$q/$q\\$q$q}'"; fi
  done
  printf '%s' "${out# }"
}

# Every command that changes the system: printed, then run (never in a dry run), stdin closed.
run() {
  printf '+ %s\n' "$(quote_cmd "$@")"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@" </dev/null
}

# Same, feeding a secret on stdin; the secret is described, never printed.
run_secret_stdin() {
  local what=$1 secret=$2
  shift 2
  printf '+ %s < (%s, not shown)\n' "$(quote_cmd "$@")" "$what"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@" <<<"$secret"
}

# Write a file from a shell variable: atomically, with mode and owner; content shown only if not secret.
write_file() {
  local path=$1 mode=$2 owner=$3 content=$4 shown=$5 tmp
  printf '+ install -m %s -o %s -g %s /dev/stdin %s < (%s)\n' "$mode" "$owner" "$owner" "$path" "$shown"
  [[ $DRY_RUN == 1 ]] && return 0
  tmp=$(umask 077 && mktemp "$(dirname "$path")/.$(basename "$path").XXXXXX")
  printf '%s' "$content" >"$tmp"
  chown "$owner:$owner" "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
}

retry() {
  local tries=$1 i
  shift
  for ((i = 1; ; i++)); do
    "$@" && return 0
    ((i >= tries)) && return 1
    warn "attempt $i of $tries failed: $(quote_cmd "$@"); retrying in $((i * 10)) s"
    sleep $((i * 10))
  done
}

have() { command -v "$1" >/dev/null 2>&1; }

APT_UPDATED=0
apt_update() {
  if ((APT_UPDATED == 0)); then
    retry 3 run apt-get -o DPkg::Lock::Timeout=600 update -q
    APT_UPDATED=1
  fi
}

apt_install() {
  have apt-get || die "apt-get not found: this script supports Debian and Ubuntu; install $* yourself"
  apt_update
  retry 2 run apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold install -y -q "$@"
}

# --- GCE metadata ----------------------------------------------------------------------------------

ON_GCE_DETECTED=0

detect_gce() {
  case "${ON_GCE:-}" in
    1 | true | yes) ON_GCE_DETECTED=1; return ;;
    0 | false | no) ON_GCE_DETECTED=0; return ;;
  esac
  if grep -qs 'Google' /sys/class/dmi/id/product_name /sys/class/dmi/id/bios_vendor 2>/dev/null; then
    if [[ $DRY_RUN == 1 ]]; then
      ON_GCE_DETECTED=1
    elif have curl && md_get instance/id >/dev/null; then
      ON_GCE_DETECTED=1
    else
      warn "this looks like a Google VM but its metadata server does not answer: no metadata read"
    fi
  fi
}

# Print one metadata value (never logged by callers); fails when absent. No network in a dry run.
md_get() {
  [[ $DRY_RUN == 1 ]] && return 1
  curl -fsS -m 3 --retry 2 -H 'Metadata-Flavor: Google' "$METADATA_URL/$1" 2>/dev/null
}

md_attr() { md_get "instance/attributes/$1"; }

# --- settings --------------------------------------------------------------------------------------

load_script_settings() {
  local key value missing=()
  for key in $SCRIPT_KEYS; do
    [[ -n ${!key+x} ]] || missing+=("$key")
  done
  if ((ON_GCE_DETECTED == 1)); then
    if [[ $DRY_RUN == 1 ]]; then
      ((${#missing[@]} == 0)) || note "dry run: would read GCE metadata attributes ${missing[*]} (not read)"
    else
      for key in "${missing[@]}"; do
        if value=$(md_attr "$key"); then
          printf -v "$key" '%s' "$value"
          log "setting $key from GCE metadata"
        fi
      done
    fi
  fi
  IMAGE=${IMAGE:-$DEFAULT_IMAGE}
  PORT=${PORT:-8080}
  BIND_ADDRESS=${BIND_ADDRESS:-}
  DATA_DIR=${DATA_DIR:-/mnt/labeling-data}
  DATA_DISK=${DATA_DISK:-}
  CONTAINER_UID=${CONTAINER_UID:-1000}
  FORCE_GPU=${FORCE_GPU:-}
  INSTALL_NVIDIA_DRIVER=${INSTALL_NVIDIA_DRIVER:-1}
  NVIDIA_DRIVER_PACKAGE=${NVIDIA_DRIVER_PACKAGE:-}
  AUTO_REBOOT=${AUTO_REBOOT:-$ON_GCE_DETECTED}
  HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
  SHM_SIZE=${SHM_SIZE:-1g}
  METADATA_KEYS=${METADATA_KEYS:-$DEFAULT_METADATA_KEYS}
  REGISTRY_USERNAME=${REGISTRY_USERNAME:-}
  REGISTRY_PASSWORD=${REGISTRY_PASSWORD:-}

  if ! [[ $PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((PORT > 65535)); then die "PORT must be a port number, got '$PORT'"; fi
  [[ $HEALTH_TIMEOUT =~ ^[0-9]+$ ]] || die "HEALTH_TIMEOUT must be a number of seconds"
  [[ $CONTAINER_UID =~ ^[0-9]+$ ]] || die "CONTAINER_UID must be a number"
  [[ $DATA_DIR =~ ^/[A-Za-z0-9/_.-]*$ && $DATA_DIR != / && $DATA_DIR != *..* ]] ||
    die "DATA_DIR must be an absolute path of letters, digits and / _ . - (got '$DATA_DIR')"
  DATA_DIR=${DATA_DIR%/}
  [[ -z $DATA_DISK || $DATA_DISK =~ ^/dev/[A-Za-z0-9/_.:-]+$ ]] || die "DATA_DISK must be a /dev/... path"
  [[ $IMAGE =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || die "IMAGE is not an image reference: '$IMAGE'"
  [[ -z $BIND_ADDRESS || $BIND_ADDRESS =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "BIND_ADDRESS must be an IPv4 address"
  if [[ $IMAGE == "$DEFAULT_IMAGE" ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      warn "IMAGE is the placeholder $DEFAULT_IMAGE: set IMAGE to the published image"
    else
      die "IMAGE is the placeholder $DEFAULT_IMAGE: set IMAGE (environment or GCE metadata) to the published image"
    fi
  fi
}

# --- steps -----------------------------------------------------------------------------------------

install_prerequisites() {
  local pkgs=()
  have curl || pkgs+=(curl)
  [[ -e /etc/ssl/certs/ca-certificates.crt ]] || pkgs+=(ca-certificates)
  if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]}"
    apt_install "${pkgs[@]}"
  fi
}

# Docker from the distribution's own package (docker.io): one apt-get, no third-party repository or key to
# trust, available on Debian 11+ and Ubuntu 20.04+, and recent enough for everything used here (--gpus
# needs 19.03, health checks and the "local" log driver 18.09). Docker's own apt repository (docker-ce) is
# newer but adds a repository and key per distribution; an already installed Docker of either kind is kept.
install_docker() {
  if have docker; then
    log "Docker already installed: $(command -v docker) (skipping install)"
    if [[ $DRY_RUN != 1 ]] && ! docker info >/dev/null 2>&1; then
      run systemctl enable --now docker
    fi
    return
  fi
  log "installing Docker (docker.io from the distribution)"
  apt_install docker.io
  run systemctl enable --now docker
}

GPU=0          # an NVIDIA GPU is present
GPU_READY=0    # containers can use it: driver loaded and toolkit installed

detect_gpu() {
  case "$FORCE_GPU" in
    1 | true | yes) GPU=1; log "FORCE_GPU=$FORCE_GPU: acting as if an NVIDIA GPU were present"; return ;;
    0 | false | no) GPU=0; log "FORCE_GPU=$FORCE_GPU: acting as if no GPU were present"; return ;;
    "") ;;
    *) die "FORCE_GPU must be 1 or 0" ;;
  esac
  local dev class
  if [[ -e /dev/nvidia0 ]]; then GPU=1; fi
  # PCI vendor 0x10de (NVIDIA), class 0x03xxxx (display / 3D controller): no need for lspci (pciutils).
  for dev in /sys/bus/pci/devices/*; do
    [[ -r $dev/vendor && -r $dev/class ]] || continue
    class=$(<"$dev/class")
    if [[ $(<"$dev/vendor") == 0x10de && $class == 0x03* ]]; then GPU=1; fi
  done
  if ((GPU == 1)); then log "NVIDIA GPU detected"; else log "no NVIDIA GPU detected: CPU mode"; fi
}

# The image's torch 2.14.1 is a CUDA 13 build: it needs an NVIDIA driver of the 580 branch or newer. With an older
# driver the appliance runs on the CPU (and says so in `appliance status`), so an older driver counts as missing.
MIN_DRIVER_MAJOR=580

driver_version() { nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1; }
driver_works() {
  have nvidia-smi && nvidia-smi -L >/dev/null 2>&1 || return 1
  local version
  version=$(driver_version)
  [[ ${version%%.*} =~ ^[0-9]+$ ]] && ((${version%%.*} >= MIN_DRIVER_MAJOR)) && return 0
  warn "NVIDIA driver ${version:-unknown} is older than $MIN_DRIVER_MAJOR, which the image's CUDA 13 build needs"
  return 1
}

# Best effort: the driver is the one step that can need a reboot and, on Debian, the non-free archive.
# Other routes on GCE: an image that ships the driver (Deep Learning VM images; set INSTALL_NVIDIA_DRIVER=0)
# or Google's installer (GCE docs, "Install GPU drivers"). Container-Optimized OS (`cos-extensions install gpu`)
# has no apt and is not a target of this script.
install_nvidia_driver() {
  if [[ $DRY_RUN != 1 ]] && driver_works; then
    log "NVIDIA driver present: $(driver_version)"
    return 0
  fi
  if [[ $DRY_RUN == 1 ]] && have nvidia-smi; then
    note "dry run: nvidia-smi found, the driver would be checked with nvidia-smi -L"
    return 0
  fi
  if [[ $INSTALL_NVIDIA_DRIVER != 1 ]]; then
    warn "no working NVIDIA driver and INSTALL_NVIDIA_DRIVER=$INSTALL_NVIDIA_DRIVER: install one, then re-run"
    return 1
  fi
  local id="" id_like=""
  if [[ -r /etc/os-release ]]; then
    id=$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"')
    id_like=$(sed -n 's/^ID_LIKE=//p' /etc/os-release | tr -d '"')
  fi
  log "installing the NVIDIA driver (best effort; this can take several minutes)"
  if [[ -n $NVIDIA_DRIVER_PACKAGE ]]; then
    # shellcheck disable=SC2086  # a list of package names
    apt_install $NVIDIA_DRIVER_PACKAGE || { warn "could not install $NVIDIA_DRIVER_PACKAGE"; return 1; }
  elif [[ $id == ubuntu || $id_like == *ubuntu* ]]; then
    # ubuntu-drivers picks the recommended, signed (Secure Boot friendly) driver for this GPU and kernel.
    apt_install ubuntu-drivers-common
    # The branch is pinned: the recommended one can be older than the CUDA build in the image accepts.
    run ubuntu-drivers install "nvidia:${MIN_DRIVER_MAJOR}-server" ||
      apt_install "nvidia-driver-${MIN_DRIVER_MAJOR}-server" || {
      warn "could not install nvidia-driver-${MIN_DRIVER_MAJOR}-server: set NVIDIA_DRIVER_PACKAGE to a driver" \
        "of the $MIN_DRIVER_MAJOR branch or newer"
      return 1
    }
  elif [[ $id == debian || $id_like == *debian* ]]; then
    # Debian ships the driver in contrib/non-free; the module is built by DKMS against the running kernel
    # (unsigned: with Secure Boot on, it does not load).
    [[ $DRY_RUN == 1 ]] || apt_update
    local candidate
    candidate=$(apt-cache policy nvidia-driver 2>/dev/null | sed -n 's/^ *Candidate: \([0-9]*\).*/\1/p')
    if [[ -n $candidate ]] && ((candidate < MIN_DRIVER_MAJOR)); then
      warn "Debian's nvidia-driver is $candidate, older than $MIN_DRIVER_MAJOR (the image's CUDA 13 build):" \
        "set NVIDIA_DRIVER_PACKAGE=cuda-drivers with NVIDIA's CUDA apt repository, or use an image with a" \
        "newer driver (GCE Deep Learning VM, INSTALL_NVIDIA_DRIVER=0). Continuing in CPU mode."
      return 1
    fi
    if [[ -n $candidate ]]; then
      apt_install "linux-headers-$(uname -r)" nvidia-driver firmware-misc-nonfree || {
        warn "could not install nvidia-driver"
        return 1
      }
    else
      warn "Debian's nvidia-driver is not available: add the 'contrib non-free non-free-firmware' components to" \
        "/etc/apt/sources.list(.d), or use an image with the driver (GCE Deep Learning VM, INSTALL_NVIDIA_DRIVER=0)," \
        "or Ubuntu; then re-run this script. Continuing in CPU mode."
      return 1
    fi
  else
    warn "unknown distribution '$id': install the NVIDIA driver yourself, then re-run. Continuing in CPU mode."
    return 1
  fi
  [[ $DRY_RUN == 1 ]] && return 0
  run modprobe nvidia || true
  driver_works && return 0
  # Freshly installed but not loaded: the kernel module needs a reboot.
  local marker=/var/lib/labeling-appliance/rebooted-for-nvidia-driver
  if [[ $AUTO_REBOOT == 1 && ! -e $marker ]]; then
    log "the NVIDIA driver needs a reboot: rebooting once now (the startup script runs again after it)"
    run mkdir -p "$(dirname "$marker")"
    run touch "$marker"
    run systemctl reboot
    exit 0
  fi
  warn "the NVIDIA driver is installed but not loaded yet: reboot, then re-run this script to use the GPU." \
    "Continuing in CPU mode."
  return 1
}

# Each step stops the function on failure (it is called as a condition, where set -e does not apply), so a
# half-configured repository never reaches apt; the appliance then starts in CPU mode.
install_container_toolkit() {
  if have nvidia-ctk; then
    log "NVIDIA container toolkit already installed (skipping install)"
  else
    log "installing the NVIDIA container toolkit from NVIDIA's apt repository"
    if ! have gpg; then apt_install gnupg || return 1; fi
    run curl -fsSL -o "$WORK/nvidia.gpgkey" "$NVIDIA_REPO/gpgkey" || return 1
    run gpg --batch --yes --dearmor -o "$NVIDIA_KEYRING" "$WORK/nvidia.gpgkey" || return 1
    run curl -fsSL -o "$WORK/nvidia.list" "$NVIDIA_REPO/stable/deb/nvidia-container-toolkit.list" || return 1
    run sed -i "s#deb https://#deb [signed-by=$NVIDIA_KEYRING] https://#g" "$WORK/nvidia.list" || return 1
    run install -m 0644 "$WORK/nvidia.list" /etc/apt/sources.list.d/nvidia-container-toolkit.list || return 1
    APT_UPDATED=0
    apt_install nvidia-container-toolkit || return 1
  fi
  if [[ $DRY_RUN != 1 ]] && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"'; then
    log "Docker already knows the nvidia runtime"
  else
    run nvidia-ctk runtime configure --runtime=docker || return 1
    run systemctl restart docker || return 1
  fi
}

setup_gpu() {
  detect_gpu
  ((GPU == 1)) || return 0
  local driver_ok=0
  if install_nvidia_driver; then driver_ok=1; fi
  local toolkit_ok=0
  if install_container_toolkit; then toolkit_ok=1; else warn "could not install the NVIDIA container toolkit"; fi
  if [[ $DRY_RUN == 1 ]]; then
    note "dry run: assuming the GPU steps above succeed, so the container gets --gpus all"
    GPU_READY=1
  elif ((driver_ok == 1 && toolkit_ok == 1)) && { have nvidia-container-runtime-hook || have nvidia-container-toolkit; }; then
    GPU_READY=1
  else
    warn "GPU present but not usable by containers yet: starting in CPU mode"
  fi
}

prepare_data_disk() {
  local dev fstype="" pttype="" uuid mounted_at opts line existing
  log "data disk $DATA_DISK -> $DATA_DIR"
  if [[ $DRY_RUN != 1 ]]; then
    local i
    for ((i = 0; i < 60; i++)); do [[ -b $DATA_DISK ]] && break; sleep 1; done
    [[ -b $DATA_DISK ]] || die "DATA_DISK $DATA_DISK is not a block device (is the disk attached?)"
  fi
  dev=$(readlink -f "$DATA_DISK" 2>/dev/null || printf '%s' "$DATA_DISK")
  if [[ -b $dev ]]; then
    fstype=$(blkid -p -o value -s TYPE "$dev" 2>/dev/null || true)
    pttype=$(blkid -p -o value -s PTTYPE "$dev" 2>/dev/null || true)
  fi
  if [[ $DRY_RUN == 1 && ( ! -b $dev || ( -z $fstype && -z $pttype ) ) ]]; then
    # Not present here, or not readable without root: show the first-boot path with its guard.
    note "dry run: $DATA_DISK is formatted only if 'blkid -p' finds neither a filesystem nor a partition table on it"
    run mkfs.ext4 -q -m 0 -L labeling-data -E lazy_itable_init=0,lazy_journal_init=0,discard "$dev"
    fstype=ext4
    uuid="<UUID of $DATA_DISK>"
  else
    if [[ -z $fstype && -n $pttype ]]; then
      die "$DATA_DISK has a partition table ($pttype) but no filesystem: point DATA_DISK at a partition; not formatting"
    fi
    if [[ -z $fstype ]]; then
      log "$DATA_DISK has no filesystem: formatting it ext4 (first boot)"
      run mkfs.ext4 -q -m 0 -L labeling-data -E lazy_itable_init=0,lazy_journal_init=0,discard "$dev"
      [[ $DRY_RUN == 1 ]] || udevadm settle 2>/dev/null || true
      fstype=ext4
    else
      log "$DATA_DISK already has a $fstype filesystem: keeping it"
    fi
    uuid=$(blkid -p -o value -s UUID "$dev" 2>/dev/null || true)
    [[ -n $uuid || $DRY_RUN == 1 ]] || die "no UUID found on $DATA_DISK"
    uuid=${uuid:-"<UUID of $DATA_DISK>"}
  fi
  if [[ -b $dev ]]; then
    mounted_at=$(findmnt -rn -S "$dev" -o TARGET 2>/dev/null | head -n1 || true)
    if [[ -n $mounted_at && $mounted_at != "$DATA_DIR" ]]; then
      die "$DATA_DISK is already mounted at $mounted_at, not at DATA_DIR=$DATA_DIR"
    fi
  fi

  # nofail: a missing disk does not stop the boot; x-systemd.before: Docker (and the container it restarts)
  # waits for this mount, so the container never writes into the empty directory underneath.
  opts="defaults,nofail,x-systemd.before=docker.service"
  [[ $fstype != ext4 ]] || opts="discard,$opts"
  line="UUID=$uuid $DATA_DIR $fstype $opts 0 2"
  existing=$(awk -v mp="$DATA_DIR" '$1 !~ /^#/ && $2 == mp' /etc/fstab 2>/dev/null || true)
  if [[ $existing == "$line" ]]; then
    log "/etc/fstab already mounts $DATA_DIR"
  else
    run cp -p /etc/fstab /etc/fstab.before-labeling-appliance
    if [[ -n $existing ]]; then
      run sed -i "\\#^[^#[:space:]]\\+[[:space:]]\\+${DATA_DIR//./\\.}[[:space:]]#d" /etc/fstab
    fi
    printf '+ %s\n' "echo '$line' >> /etc/fstab"
    [[ $DRY_RUN == 1 ]] || printf '%s\n' "$line" >>/etc/fstab
    if have systemctl; then run systemctl daemon-reload; fi
  fi
  run mkdir -p "$DATA_DIR"
  if [[ $DRY_RUN == 1 ]] || ! mountpoint -q "$DATA_DIR"; then
    run mount "$DATA_DIR"
  fi
  [[ $DRY_RUN == 1 ]] || mountpoint -q "$DATA_DIR" || die "$DATA_DIR is not mounted: not starting on the boot disk"
}

prepare_data_dir() {
  if [[ -n $DATA_DISK ]]; then
    prepare_data_disk
  else
    log "no DATA_DISK: data lives in $DATA_DIR on the boot disk"
    run mkdir -p "$DATA_DIR"
  fi
  run chown "$CONTAINER_UID:$CONTAINER_UID" "$DATA_DIR"
  run chmod 0750 "$DATA_DIR"
}

KEY_FILE=""

write_gcp_key() {
  local b64="${GOOGLE_APPLICATION_CREDENTIALS_BASE64:-}" source="environment" decoded
  if [[ -z $b64 && $ON_GCE_DETECTED == 1 ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      note "dry run: would read GCE metadata attribute GOOGLE_APPLICATION_CREDENTIALS_BASE64 (not read)"
    elif b64=$(md_attr GOOGLE_APPLICATION_CREDENTIALS_BASE64); then
      source="GCE metadata"
    else
      b64=""
    fi
  fi
  if [[ -n $b64 ]]; then
    decoded=$(printf '%s' "$b64" | tr -d '[:space:]' | base64 -d 2>/dev/null) ||
      die "GOOGLE_APPLICATION_CREDENTIALS_BASE64 (from $source) is not valid base64"
    [[ $decoded =~ ^[[:space:]]*\{ ]] ||
      warn "GOOGLE_APPLICATION_CREDENTIALS_BASE64 does not decode to JSON: is it a service-account key?"
    log "writing the service-account key from GOOGLE_APPLICATION_CREDENTIALS_BASE64 ($source)"
    write_file "$DATA_DIR/gcp-key.json" 0600 "$CONTAINER_UID" "$decoded"$'\n' \
      "decoded GOOGLE_APPLICATION_CREDENTIALS_BASE64, ${#decoded} bytes, not shown"
    KEY_FILE="$DATA_DIR/gcp-key.json"
  elif [[ -f $DATA_DIR/gcp-key.json ]]; then
    log "keeping the service-account key already in $DATA_DIR/gcp-key.json"
    KEY_FILE="$DATA_DIR/gcp-key.json"
  fi
}

ENV_FILE=""

# DATA_DIR/appliance.env: the earlier file, then metadata attributes, then the environment (last wins).
write_env_file() {
  ENV_FILE="$DATA_DIR/appliance.env"
  local -A values=()
  local order=() key value line skipped=()
  set_value() {
    if [[ $MANAGED_KEYS == *" $1 "* ]]; then
      warn "$1 is set by this script (given via $3): ignored"
      return
    fi
    if [[ $2 == *$'\n'* ]]; then
      skipped+=("$1")
      return
    fi
    [[ -n ${values[$1]+x} ]] || order+=("$1")
    values[$1]=$2
  }
  if [[ -r $ENV_FILE ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
      if [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
        set_value "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "the existing file"
      fi
    done <"$ENV_FILE"
  fi
  for key in $METADATA_KEYS; do
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "METADATA_KEYS: '$key' is not a variable name"
  done
  if ((ON_GCE_DETECTED == 1)); then
    if [[ $DRY_RUN == 1 ]]; then
      # shellcheck disable=SC2086  # a whitespace-separated list
      note "dry run: would read GCE metadata attributes $(printf '%s ' $METADATA_KEYS)(not read)"
    else
      for key in $METADATA_KEYS; do
        if value=$(md_attr "$key"); then set_value "$key" "$value" "GCE metadata"; fi
      done
    fi
  fi
  while IFS= read -r -d '' line; do
    key=${line%%=*}
    if [[ $key =~ ^(APPLIANCE|LABEL_STUDIO)_[A-Za-z0-9_]*$ || " ${METADATA_KEYS//$'\n'/ } " == *" $key "* ]]; then
      set_value "$key" "${line#*=}" "the environment"
    fi
  done < <(env -0)
  ((${#skipped[@]} == 0)) ||
    warn "skipped (multi-line values cannot go in an env file; use APPLIANCE_LABEL_CONFIG_FILE): ${skipped[*]}"
  local content=""
  for key in "${order[@]}"; do content+="$key=${values[$key]}"$'\n'; done
  log "writing $ENV_FILE: ${#order[@]} settings${order:+ (${order[*]})}, values not shown"
  write_file "$ENV_FILE" 0600 root "$content" "${#order[@]} settings, values not shown"
  unset -f set_value
}

registry_login() {
  local host=${IMAGE%%/*} token json
  [[ $IMAGE == */* && ( $host == *.* || $host == *:* || $host == localhost ) ]] || host="docker.io"
  if [[ -n $REGISTRY_USERNAME && -n $REGISTRY_PASSWORD ]]; then
    run_secret_stdin "REGISTRY_PASSWORD" "$REGISTRY_PASSWORD" \
      docker login --username "$REGISTRY_USERNAME" --password-stdin "$host"
    LOGGED_IN=$host
  elif ((ON_GCE_DETECTED == 1)) && [[ $host == *-docker.pkg.dev || $host == gcr.io || $host == *.gcr.io ]]; then
    # The VM's service account (it needs Artifact Registry Reader and a storage/cloud-platform scope).
    if [[ $DRY_RUN == 1 ]]; then
      token="(dry run)"
    else
      json=$(md_get instance/service-accounts/default/token) || { warn "no access token from the metadata server"; return 0; }
      token=$(printf '%s' "$json" | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
      [[ -n $token ]] || { warn "no access token in the metadata server's answer"; return 0; }
    fi
    run_secret_stdin "the VM service account's access token from the metadata server" "$token" \
      docker login --username oauth2accesstoken --password-stdin "https://$host"
    LOGGED_IN="https://$host"
  fi
}

pull_image() {
  LOGGED_IN=""
  registry_login
  log "pulling $IMAGE"
  if ! retry 3 run docker pull "$IMAGE"; then
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
      warn "could not pull $IMAGE: starting the copy already on this machine"
    else
      die "could not pull $IMAGE (a private registry? set REGISTRY_USERNAME / REGISTRY_PASSWORD)"
    fi
  fi
  if [[ -n $LOGGED_IN ]]; then run docker logout "$LOGGED_IN" || true; fi
}

start_container() {
  if [[ $DRY_RUN == 1 ]] || docker container inspect "$CONTAINER_NAME" >/dev/null 2>&1; then
    log "replacing the container $CONTAINER_NAME (the data in $DATA_DIR stays)"
    run docker rm -f "$CONTAINER_NAME"
  fi
  local args=(docker run -d --name "$CONTAINER_NAME" --restart unless-stopped
    -p "${BIND_ADDRESS:+$BIND_ADDRESS:}$PORT:8080"
    -v "$DATA_DIR:/data"
    --env-file "$ENV_FILE"
    --shm-size "$SHM_SIZE"
    --log-driver local)
  if [[ -n $KEY_FILE ]]; then
    args+=(-v "$KEY_FILE:$KEY_IN_CONTAINER:ro" -e "GOOGLE_APPLICATION_CREDENTIALS=$KEY_IN_CONTAINER")
  fi
  if ((GPU_READY == 1)); then args+=(--gpus all); fi
  args+=("$IMAGE")
  local mode=CPU
  ((GPU_READY == 0)) || mode=GPU
  log "starting $CONTAINER_NAME ($mode mode)"
  run "${args[@]}"
}

wait_healthy() {
  local host=${BIND_ADDRESS:-127.0.0.1}
  [[ $host != 0.0.0.0 ]] || host=127.0.0.1
  local url="http://$host:$PORT/health"
  if [[ $DRY_RUN == 1 ]]; then
    note "dry run: would wait up to ${HEALTH_TIMEOUT}s for $url (or docker's health status 'healthy')"
    return 0
  fi
  log "waiting up to ${HEALTH_TIMEOUT}s for the appliance to be healthy"
  local deadline=$((SECONDS + HEALTH_TIMEOUT)) status health
  while :; do
    status=$(docker inspect -f '{{.State.Status}}' "$CONTAINER_NAME" 2>/dev/null || echo missing)
    health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$CONTAINER_NAME" 2>/dev/null || true)
    if [[ $health == healthy ]] || curl -fsS -m 3 -o /dev/null "$url" 2>/dev/null; then
      log "healthy"
      return 0
    fi
    if [[ $status == exited || $status == dead || $status == missing ]]; then
      docker logs --tail 40 "$CONTAINER_NAME" 2>&1 || true
      die "the container stopped ($status): see 'sudo docker logs $CONTAINER_NAME'"
    fi
    if ((SECONDS >= deadline)); then
      docker logs --tail 20 "$CONTAINER_NAME" 2>&1 || true
      die "not healthy after ${HEALTH_TIMEOUT}s (status $status, health ${health:-none}): see 'sudo docker logs -f $CONTAINER_NAME'"
    fi
    sleep 5
  done
}

print_summary() {
  local ip=""
  if ((ON_GCE_DETECTED == 1)) && [[ $DRY_RUN != 1 ]]; then
    ip=$(md_get instance/network-interfaces/0/access-configs/0/external-ip || true)
  fi
  [[ -n $ip ]] || ip=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
  if [[ -n $BIND_ADDRESS && $BIND_ADDRESS != 0.0.0.0 ]]; then ip=$BIND_ADDRESS; fi
  if [[ $ip == *:* ]]; then ip="[$ip]"; fi
  local url="http://${ip:-VM-ADDRESS}:$PORT" suffix=""
  [[ $DRY_RUN != 1 ]] || suffix="   (dry run: nothing was started)"
  cat <<EOF

Labeling appliance: $url$suffix
  admin login and password:  sudo docker exec $CONTAINER_NAME appliance credentials
                             (also in $DATA_DIR/secrets.env, mode 0600; not printed here)
  status / logs:             sudo docker exec $CONTAINER_NAME appliance status
                             sudo docker logs -f $CONTAINER_NAME
  settings:                  $ENV_FILE (edit, then re-run this script)
EOF
  if ((ON_GCE_DETECTED == 1)); then
    echo "  GCE: the port needs a firewall rule, e.g. gcloud compute firewall-rules create allow-labeling --allow tcp:$PORT --target-tags labeling"
  fi
}

main() {
  DRY_RUN=${DRY_RUN:-0}
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      -n | --dry-run) DRY_RUN=1 ;;
      *) printf 'unknown argument: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
  done
  case "$DRY_RUN" in 1 | true | yes) DRY_RUN=1 ;; *) DRY_RUN=0 ;; esac

  if [[ $DRY_RUN == 1 ]]; then
    log "DRY RUN: every action is printed as '+ command' and nothing is changed"
    WORK="/tmp/labeling-appliance.XXXXXX"
  else
    ((EUID == 0)) || die "run as root (sudo), or with --dry-run to see what it would do"
    WORK=$(mktemp -d /tmp/labeling-appliance.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a

  install_prerequisites   # curl, needed to read GCE metadata
  detect_gce
  ((ON_GCE_DETECTED == 0)) || log "running on Google Compute Engine: settings may come from instance metadata"
  load_script_settings
  install_docker
  setup_gpu
  prepare_data_dir
  write_gcp_key
  write_env_file
  pull_image
  start_container
  wait_healthy
  print_summary
}

main "$@"
