"""File names from widgets -> paths inside a models folder, and writes that never leave half a file behind."""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import FP8ClipError

EXTENSION = ".safetensors"


def check_name(name: str) -> str:
    """`name` as a relative path with '/' separators; names that could leave a models folder are refused."""
    raw = (name or "").strip()
    if not raw:
        raise FP8ClipError("The file name is empty. Enter a name such as 'fp8/clip_l_fp8'.")
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or ".." in parts or raw.startswith("~"):
        raise FP8ClipError(f"File name {name!r} points outside the models folder. Use a plain name, optionally "
                           "with sub-folders ('fp8/clip_l_fp8'), without '..', '~', a drive or a leading '/'.")
    if any(p.startswith(".") for p in parts):
        raise FP8ClipError(f"File name {name!r} has a part starting with '.'; use a plain name.")
    return "/".join(parts)


def resolve_in_folder(folder: str | os.PathLike, name: str, extension: str = EXTENSION) -> Path:
    """Where to write `name` (may contain sub-folders) in `folder`; anything that could escape it is refused,
    a symlinked sub-folder pointing elsewhere included. (Reading follows the links ComfyUI lists.)"""
    rel = check_name(name)
    if not rel.lower().endswith(extension):
        rel += extension
    base = Path(folder).resolve()
    path = (base / rel).resolve()
    try:
        inside = os.path.commonpath([base, path]) == str(base)
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise FP8ClipError(f"File name {name!r} resolves outside the models folder {base}.")
    return path


def write_atomic(path: Path, write: Callable[[str], None], overwrite: bool) -> Path:
    """`write(tmp_path)` then move the finished file into place: readers never see a partial file, and an
    existing file is replaced only when `overwrite` is set (checked again at the final step, without a race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FP8ClipError(f"{path.name} already exists in {path.parent}. Choose another file name, or set "
                           "'overwrite' to replace it.")
    fd, tmp = create_temp(path.parent, "." + path.name + ".")
    os.close(fd)
    try:
        mode = os.stat(tmp).st_mode & 0o777  # what open() gives here
        write(tmp)
        os.chmod(tmp, mode)  # safetensors replaces the file with a 0600 one
        fd = os.open(tmp, os.O_RDWR)  # Windows cannot fsync a read-only handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name was taken meanwhile, unlike os.replace
            except FileExistsError:
                raise FP8ClipError(f"{path.name} was created by someone else while saving; nothing was "
                                   "overwritten. Choose another file name.") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise FP8ClipError(f"{path.name} already exists; nothing was overwritten.") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_set(files: list[tuple[Path, Callable[[str], None]]], overwrite: bool) -> list[Path]:
    """`write_atomic` for the files of one model (a tower each): without `overwrite`, a failure part-way removes
    the files this call wrote, so a retry does not find half a set in its way (a replaced file cannot be given
    back, so with `overwrite` the written ones stay)."""
    written: list[Path] = []
    try:
        for path, write in files:
            written.append(write_atomic(path, write, overwrite))
    except BaseException:
        if not overwrite:
            for p in written:
                p.unlink(missing_ok=True)
        raise
    return written


def create_temp(directory: str | os.PathLike, prefix: str) -> tuple[int, str]:
    """A new temp file open for writing, with the mode a plain open() gives (0666 less the umask, applied by
    the OS): mkstemp's 0600 would hide saved models from other users (a container's host, a shared folder)."""
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file in {directory}.")
