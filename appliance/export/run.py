"""`appliance export`: Items from source.py through a writer of formats.py into a folder or a bucket.

The folder gets ``manifest.json`` last (format, source, counts, labels, what failed): a folder without it is an
export that did not finish. To gs://bucket/prefix the export is written to a local staging folder first and
uploaded with the manifest last, so a reader that finds the manifest finds every file.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from appliance.export import formats, source
from appliance.export.source import ExportError, Item
from appliance.settings import Settings

MANIFEST = "manifest.json"


@dataclass
class Summary:
    output: str
    format: str
    source: str
    images: int = 0
    objects: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def export(settings: Settings, fmt: str, output: str, *, version: str | None = None, include_images: bool = False,
           with_predictions: bool = False, progress: bool = True) -> Summary:
    began = time.monotonic()
    to_bucket = output.startswith("gs://")
    folder = settings.cache_dir / f"export-{uuid.uuid4().hex[:8]}" if to_bucket else Path(output)
    _check_empty(folder)
    fetcher = _fetcher(settings)
    if version:
        labels, items, total = _version_items(settings, version)
        what = f"model version {version} (its training and held-out sets)"
    else:
        labels, items, total = _project_items(settings, with_predictions, fetcher, keep_tasks=fmt == "label-studio")
        what = "the project's " + ("annotations and predictions" if with_predictions else "submitted annotations")
    writer = formats.writer(fmt, folder, labels, source.SPLITS if version else ())
    summary = Summary(output, fmt, what)
    try:
        with tqdm(total=total, unit="image", desc=f"export {fmt}", disable=not progress, file=sys.stderr) as bar:
            for item in items:
                bar.update(1)
                if isinstance(item, str):
                    summary.failed.append(item)
                    continue
                try:
                    data = _image(fetcher, item) if include_images else None
                except Exception as error:  # noqa: BLE001 - one broken image fails its task, not the export
                    summary.failed.append(f"task {item.task_id}: image not exported ({_first_line(error)})")
                    data = None
                writer.add(item, data)
        writer.finish()
        summary.images, summary.objects = writer.images, writer.objects
        _manifest(folder, summary, labels, version, include_images)
        if to_bucket:
            from appliance import gcs

            gcs.upload_folder(settings, folder, output, last=MANIFEST)
    finally:
        if to_bucket:
            shutil.rmtree(folder, ignore_errors=True)
    summary.seconds = time.monotonic() - began
    return summary


def dataset_uri(settings: Settings, version: str) -> str:
    prefix = settings.gcs_target_prefix.strip("/")
    return f"gs://{settings.gcs_target_bucket}/{prefix + '/' if prefix else ''}datasets/{version}"


def publish_dataset(settings: Settings, version: str) -> str:
    """A published version's training and held-out sets as COCO under gs://<target>/datasets/vNNNN/ (manifest
    last); returns the URI."""
    uri = dataset_uri(settings, version)
    export(settings, "coco", uri, version=version, progress=False)
    return uri


def _check_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ExportError(f"{folder} exists and is not an empty folder: choose a new --output")


def _fetcher(settings: Settings):
    from appliance.labelstudio.images import ImageFetcher

    return ImageFetcher.from_settings(settings)


def _project_items(settings: Settings, with_predictions: bool, fetcher, keep_tasks: bool):
    from appliance.labelstudio import client as studio_api
    from appliance.labelstudio import labeling, state

    project_id = state.project_id(settings)
    if not project_id:
        raise ExportError("the project does not exist yet: start the appliance (`appliance up`) first")
    studio = studio_api.Studio(settings, timeout=120)
    spec = labeling.parse(studio.label_config(project_id))
    try:
        labels = labeling.model_labels(spec)
    except labeling.LabelingError as error:
        raise ExportError(str(error)) from error
    total = studio.project(project_id).get("task_number")

    def size_of(url: str, task_id: int) -> tuple[int, int]:
        return _decoded(fetcher.fetch(url, task_id)).size

    def predictions_of(task_id: int) -> list[dict]:
        return studio.get("/api/predictions", "reading a task's predictions", params={"task": task_id})

    def items():
        for task in source.studio_tasks(studio, project_id):
            try:
                item = source.item_of(task, labels, spec.image_key, predictions_of if with_predictions else None,
                                      size_of, keep_tasks)
            except Exception as error:  # noqa: BLE001 - a task that cannot be read is reported, not fatal
                yield f"task {task.get('id')}: {_first_line(error)}"
                continue
            if item is not None:
                yield item

    return labels, items(), total


def _version_items(settings: Settings, version: str):
    from appliance.models.registry import UnknownVersionError
    from appliance.shared.registry import open_registry

    try:
        path = open_registry(settings).path(version)
    except UnknownVersionError as error:
        raise ExportError(str(error)) from None
    labels, items = source.snapshot_items(path)
    summary = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    total = (summary.get("train_images") or 0) + (summary.get("holdout_images") or 0) or None
    return labels, items, total


def _decoded(data: bytes) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def _image(fetcher, item: Item) -> bytes:
    """The image's bytes as the masks see it: EXIF-rotated photos are written upright (without the tag)."""
    data = fetcher.fetch(item.url, item.task_id)
    image = Image.open(io.BytesIO(data))
    if image.getexif().get(0x0112, 1) in (1, None):
        return data
    upright = _decoded(data).convert("RGB")
    buffer = io.BytesIO()
    upright.save(buffer, format="JPEG" if data[:2] == b"\xff\xd8" else "PNG", quality=95)
    return buffer.getvalue()


def _manifest(folder: Path, summary: Summary, labels: list[str], version: str | None, images: bool) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    formats.write_file(folder / MANIFEST, json.dumps({
        "files": [f for f in files if f != MANIFEST],
        "format": summary.format, "source": summary.source, "version": version, "labels": labels,
        "images": summary.images, "objects": summary.objects, "images_included": images,
        "failed": summary.failed[:1000], "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=1).encode())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
