"""The one way sketchtune writes a file: whole or not at all.

Every file is written to a fresh temporary file in the destination's own folder
(so the rename never crosses a file system; ``tmp_dir`` names another folder on the
same file system where something that lists the destination's folder must never see
a temporary), flushed and fsynced, given the mode a plain ``open()`` would give it,
then renamed over the destination. A reader sees
the old file or the new one, never half of either; a failure leaves the old file
and no temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_copy", "atomic_torch_save"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None],
                 tmp_dir: str | os.PathLike | None = None) -> None:
    """Call ``write(tmp_path)`` for a temp file beside ``path`` (or in ``tmp_dir``), then
    rename it over ``path``.

    ``write`` may open ``tmp_path`` itself (pandas, matplotlib, shutil do); the file is
    fsynced here afterwards, whatever wrote it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent if tmp_dir is None else tmp_dir)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _through(path: str | os.PathLike, mode: str, emit: Callable[[BinaryIO], None],
             tmp_dir: str | os.PathLike | None = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, mode) as f:
            emit(f)

    atomic_write(path, write, tmp_dir)


def atomic_write_bytes(path: str | os.PathLike, data: bytes,
                       tmp_dir: str | os.PathLike | None = None) -> None:
    _through(path, "wb", lambda f: f.write(data), tmp_dir)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _through(path, "w", lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON with a final newline; values JSON cannot hold are written as text."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # heavy: torch; plain writes stay torch-free

    _through(path, "wb", lambda f: torch.save(obj, f))
