"""File modes of what dirotq writes (checkpoints, calibration statistics; docs/DESIGN.md §8).

safetensors' ``save_file`` creates its file with mode 0600 and ``tempfile.mkdtemp`` its folder with
0700, whatever the user's umask: a checkpoint or a statistics cache that the user's group (or a
web server reading it) cannot open. ``default_mode`` gives them what ``open()`` / ``mkdir()`` would.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux ≥ 4.7): setting and
    restoring it would race with threads that create files meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the POSIX way, set and restore
    os.umask(mask)
    return mask


def default_mode(*paths: str | os.PathLike) -> None:
    """chmod each path to the mode a plain ``open()`` (files: 0666) or ``mkdir()`` (folders: 0777)
    would have given it under the current umask, e.g. 0644 / 0755 for umask 022."""
    mask = umask()
    for p in paths:
        os.chmod(p, (0o777 if Path(p).is_dir() else 0o666) & ~mask)


__all__ = ["umask", "default_mode"]
