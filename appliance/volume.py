"""The data volume kept private: what Label Studio may serve, and who may read the rest.

- Only the appliance's user reads the volume: folders 0700, files 0600 (the database and its WAL hold the admin
  token and the backends' shared secret, like secrets.env). Processes run with umask 077 so new files start that
  way; ``make_private`` repairs a volume written before, or restored from a backup.
- Label Studio's Local Files document root is ``<data>/files``, which holds one link: to the images folder. A
  project member can therefore add Local Files storages over images only, never over the database, the journal,
  the models or the secrets.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.settings import Settings

UMASK = 0o077


def make_private(root: Path) -> int:
    """chmod every folder under ``root`` to 0700 and every file to 0600; returns how many were changed.
    Links are left alone (their targets are either inside ``root`` or the user's own folders)."""
    changed = 0
    for folder, dirs, files in os.walk(root):
        for name, mode in [(folder, 0o700)] + [(os.path.join(folder, f), 0o600) for f in files]:
            try:
                info = os.lstat(name)
            except FileNotFoundError:
                continue  # removed while we walked (a cache file, a WAL)
            if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) == mode:
                continue
            os.chmod(name, mode)
            changed += 1
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return changed


def link_served_images(settings: Settings) -> Path:
    """``<data>/files/<images folder name>`` -> the images folder: what Label Studio's Local Files can reach."""
    settings.files_root.mkdir(parents=True, exist_ok=True)
    link = settings.served_images
    if link.is_symlink() and Path(os.readlink(link)) == settings.images:
        return link
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise RuntimeError(f"{link} should be a link to the images folder but is a real folder or file: move it away")
    link.symlink_to(settings.images, target_is_directory=True)
    return link


def secure(settings: Settings) -> None:
    """Called at every start before any other process runs."""
    os.umask(UMASK)
    link_served_images(settings)
    make_private(settings.data)
