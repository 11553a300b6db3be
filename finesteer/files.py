"""File permissions: what FineSteer writes gets the modes ``open()`` would give under the user's umask.

safetensors writes its files with mode 0600 and ``tempfile.mkdtemp`` makes 0700 folders, whatever the umask; a
steerer or a converted model meant to be shared (or read by another account in a container) would then be
unreadable to others although the user's umask says otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``os.umask`` alone must set it to read
    it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes ``open()`` / ``mkdir()`` would:
    0666 / 0777 minus the umask."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
