#!/usr/bin/env bash
# System tools the test suite uses, from Debian's packages: shellcheck (deploy script lint) and Chromium (the
# browser test drives Debian's Chromium with Playwright; Playwright's own browser download is not used) and
# PostgreSQL (the appliance against a real server).
set -euo pipefail
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v chromium >/dev/null || missing+=(chromium)
[ -d /etc/postgresql ] || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[install] please install: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "[install] apt-get install ${missing[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
