#!/usr/bin/env bash
# Build the appliance image with podman on a machine without Docker and without a container registry.
#   scripts/build-image.sh [TAG]          (default tag: labeling-appliance; needs root)
# 1. The Dockerfile's FROM (python:3.11-slim-bookworm) cannot be pulled without a registry: unless an image of that
#    name is already there, one is made from Debian's packages (debootstrap --variant=minbase, the same Debian release
#    and Python minor version, slimmed like Debian's slim images) and tagged with that same name.
# 2. The repository's Dockerfile is built unchanged on top of it. The host's package settings (CA bundle, pip's
#    index folders, find-links and constraints) reach the RUN steps as read-only build-time volumes, so nothing of
#    them lands in a layer of the image.
# Network the build needs: Debian's archive (debootstrap, apt-get) and PyPI (pip), or local index folders instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-${APPLIANCE_IMAGE:-labeling-appliance}}
mirror=${DEBIAN_MIRROR:-}  # empty: debootstrap's default Debian mirror
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
step() { printf '[image] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "[image] run as root (rootful podman, debootstrap)" >&2
  exit 1
fi
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# crun refuses this machine's hybrid cgroup layout; podman's default ulimits exceed the hard limits here.
podman=(podman --runtime runc --cgroup-manager=cgroupfs)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

base=$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' "$root/Dockerfile" | head -n 1)
if [[ ! $base =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]]; then
  echo "[image] cannot make a local base for FROM $base (expected python:X.Y-slim-SUITE)" >&2
  exit 1
fi
python_minor=${BASH_REMATCH[1]}
suite=${BASH_REMATCH[2]}

if "${podman[@]}" image exists "$base"; then
  step "base image $base already here"
else
  step "base image $base from Debian $suite (debootstrap, about 2 minutes)"
  work=$(mktemp -d /var/tmp/appliance-base.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  rootfs=$work/rootfs
  # What python:X.Y-slim-SUITE holds beyond a minimal Debian: Python with venv/ensurepip, `python`, CA certificates,
  # netbase, tzdata.
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
    "$suite" "$rootfs" ${mirror:+"$mirror"} >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  # Slim like Debian's slim images: no documentation, manuals or translations, now or from later installs.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/*
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # debootstrap wrote `deb MIRROR SUITE main`; add updates and security like Debian's own images.
  mirror=$(awk '$1 == "deb" { print $2; exit }' "$rootfs/etc/apt/sources.list")
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/debian}/debian-security $suite-security main
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  got=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$got" != "$python_minor" ]; then
    echo "[image] Debian $suite has Python $got, the Dockerfile's FROM wants $python_minor" >&2
    exit 1
  fi
  tar -C "$rootfs" --numeric-owner -c . | "${podman[@]}" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$base" >/dev/null
  rm -rf "$work"
  trap - EXIT
  step "base image $base: Debian $suite, Python $got"
fi

# The host's pip settings, for the RUN steps only, leaving no trace in any layer:
# - the CA bundle and every local index folder, find-links folder and constraint file are mounted read-only under
#   /dev/host-build/ (/dev is a tmpfs in build containers: the mount points vanish with it);
# - pip.conf and .curlrc naming them lie in a throwaway folder mounted as /root, root's home in RUN steps (it exists
#   in the base, so no mount point is created; whatever a step writes there stays in the throwaway folder).
host=/dev/host-build
work=$(mktemp -d /var/tmp/appliance-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
home=$work/root
mkdir -p "$home/.config/pip"
chmod 700 "$home"
mounts=(-v "$ca:$host/ca.crt:ro" -v "$home:/root")
setting() {  # the host's value of a pip setting, from the environment first, as pip itself reads it
  local env=PIP_${1^^}
  env=${env//-/_}
  if [ -n "${!env:-}" ]; then printf '%s\n' "${!env}"; return; fi
  pip config list 2>/dev/null | sed -n "s/^[a-z:.]*\.$1='\(.*\)'$/\1/p" | tail -n 1
}
local_top() {  # the local folder (or file) a path or file:// URL needs mounted; nothing for a remote index
  local path=${1#file://}
  if [ "$path" = "$1" ] && [[ $path != /* ]]; then return; fi
  path=${path%/}
  # A local simple index links its files by relative paths (../../files/...): mount the folder above simple/.
  [ "${path##*/}" != simple ] || path=${path%/simple}
  [ ! -e "$path" ] || printf '%s' "$path"
}
{
  echo "[global]"
  echo "cert = $host/ca.crt"
  for key in index-url extra-index-url find-links constraint; do
    value=$(setting "$key")
    [ -n "$value" ] || continue
    line="$key ="
    for item in $value; do
      top=$(local_top "$item")
      if [ -n "$top" ]; then
        case " ${mounts[*]} " in *" $top:$host$top:ro "*) ;; *) mounts+=(-v "$top:$host$top:ro") ;; esac
        case $item in file://*) item=file://$host${item#file://} ;; *) item=$host$item ;; esac
      fi
      line+=" $item"
    done
    echo "$line"
  done
} >"$home/.config/pip/pip.conf"
# curl (the optional weight downloads) trusts the same CA bundle.
echo "cacert = $host/ca.crt" >"$home/.curlrc"

# The install layer is about 8 GB; committing it took 29 GB at its peak (the container, the diff, the new layer;
# sampled every 20 s, so a little more).
# Refuse early, in one line, rather than fail 10 minutes in with "no space left on device".
store=$("${podman[@]}" info --format '{{.Store.GraphRoot}}')
need_gb=${APPLIANCE_IMAGE_BUILD_SPACE_GB:-32}
free_gb=$(( $(df --output=avail -B1 "$store" | tail -n 1) / 1000000000 ))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "[image] $store has $free_gb GB free, the build needs about $need_gb GB: remove unused images" \
    "('podman image prune', 'podman rmi IMAGE') or free space there" >&2
  exit 1
fi
previous=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)

step "podman build -t $tag (build-time volumes:$(printf ' %s' "${mounts[@]}" | sed 's/ -v / /g; s/:[^ ]*//g'))"
start=$(date +%s)
# --format docker: the OCI image format has no HEALTHCHECK (podman would drop the Dockerfile's).
"${podman[@]}" build --format docker --pull=never --network host "${limits[@]}" "${mounts[@]}" \
  --layers -t "$tag" "${@:2}" "$root"
end=$(date +%s)
current=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag")
# The image this tag named before is now nameless: drop it (8 GB each) unless a container still uses it.
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${podman[@]}" rmi "$previous" >/dev/null 2>&1 && step "removed the image $tag named before (${previous:0:12})" || true
fi
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
step "built $tag in $((end - start)) s, $((size / 1000000)) MB"
