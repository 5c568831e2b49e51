"""Writing files so that a kill at any instant leaves the old version or the new one, never a torn one."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from incr_cli.errors import DiskFull


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over `path`.
    `write(handle)` fills the file. A full disk raises `DiskFull`; no temporary is left behind."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise DiskFull(
                errno.ENOSPC, f"no space left on the device while writing {path}; the previous file is intact"
            ) from None
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))
