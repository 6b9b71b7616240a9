#!/usr/bin/env bash
# System tools the test suite uses and Debian packages: shellcheck (deploy script lint).
set -euo pipefail
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[install] please install: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "[install] apt-get install ${missing[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
