"""Converge the Local Files storages that must not go through Label Studio's API. Runs with Label Studio's Python.

Reads one JSON object on stdin: {"project": id, "journal": path, "images": served path, "legacy_images": path}.
Prints one JSON line: {"journal": storage id, "journal_created": bool, "images_moved": links re-keyed}.

- The annotation journal is a Local Files export storage outside LOCAL_FILES_DOCUMENT_ROOT, on purpose: the API
  only accepts paths under the document root, and any path it accepts for an export storage it also accepts for
  an import storage, whose files every project member can then download. So the journal is created here.
- Volumes made before the document root moved to <data>/files have their images storage at the real images
  folder: it is pointed at the served path, and its links are re-keyed, so the next sync finds every image
  already imported instead of importing it twice.
"""

import json
import sys

from prepare_db import setup_django


def move_images(project_id: int, legacy: str, served: str) -> int:
    from io_storages.localfiles.models import LocalFilesImportStorage, LocalFilesImportStorageLink

    moved = 0
    for storage in LocalFilesImportStorage.objects.filter(project_id=project_id, path=legacy):
        storage.path = served
        storage.save(update_fields=["path"])
        for link in LocalFilesImportStorageLink.objects.filter(storage=storage, key__startswith=legacy + "/"):
            link.key = served + link.key[len(legacy):]
            link.save(update_fields=["key"])
            moved += 1
    return moved


def ensure_journal(project_id: int, path: str) -> tuple[int, bool]:
    from io_storages.localfiles.models import LocalFilesExportStorage
    from projects.models import Project

    storage = LocalFilesExportStorage.objects.filter(project_id=project_id, path=path).first()
    if storage is not None:
        return storage.id, False
    storage = LocalFilesExportStorage.objects.create(project=Project.objects.get(id=project_id), path=path,
                                                     title="Annotation journal", can_delete_objects=True)
    storage.sync()  # annotations made before the journal existed (synchronous: no Redis queue here)
    return storage.id, True


def main() -> None:
    params = json.load(sys.stdin)
    setup_django()
    result = {"images_moved": 0}
    if params.get("legacy_images") and params["legacy_images"] != params["images"]:
        result["images_moved"] = move_images(params["project"], params["legacy_images"], params["images"])
    result["journal"], result["journal_created"] = None, False  # shared on GCS: the API makes that one
    if params.get("journal"):
        result["journal"], result["journal_created"] = ensure_journal(params["project"], params["journal"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
