"""File names from widgets -> paths inside a models folder, and writes that never leave half a file behind."""
from __future__ import annotations

import errno
import os
import re
import secrets
import time
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import FP8ClipError

EXTENSION = ".safetensors"


def check_name(name: str) -> str:
    """`name` as a relative path with '/' separators; names that could leave a models folder are refused."""
    raw = (name or "").strip()
    if not raw:
        raise FP8ClipError("The file name is empty. Enter a name such as 'fp8/clip_l_fp8'.")
    if raw.endswith(("/", "\\")):  # 'fp8/' would become fp8.safetensors beside the folder
        raise FP8ClipError(f"File name {name!r} ends with a folder separator: add the file's name, such as "
                           "'fp8/clip_l_fp8'.")
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if not parts:  # "." (an IndexError below)
        raise FP8ClipError(f"File name {name!r} names no file. Enter a name such as 'fp8/clip_l_fp8'.")
    # '~' alone is the shell's home folder; '~old_clip' is a file ComfyUI lists like any other
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or ".." in parts or parts[0] == "~":
        raise FP8ClipError(f"File name {name!r} points outside the models folder. Use a plain name, optionally "
                           "with sub-folders ('fp8/clip_l_fp8'), without '..', '~', a drive or a leading '/'.")
    if any(p.startswith(".") for p in parts):
        raise FP8ClipError(f"File name {name!r} has a part starting with '.'; use a plain name.")
    return "/".join(parts)


def check_portable(name: str, rel: str) -> None:
    """Names of new files must be valid on every system (models folders are shared and copied between them):
    on Windows, 'clip:l' would write an alternate data stream and 'CON' a device."""
    for p in rel.split("/"):
        if re.search(r'[<>:"|?*\x00-\x1f]', p) or p.rstrip(" .") != p or p.split(".")[0].upper() in WINDOWS_RESERVED:
            raise FP8ClipError(f"File name {name!r} cannot be stored on Windows (it has one of <>:\"|?*, a part "
                               "ending in '.' or ' ', or a reserved name such as CON or NUL). Use letters, digits, "
                               "'-', '_' and '/' for sub-folders.")


WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def resolve_in_folder(folder: str | os.PathLike, name: str, extension: str = EXTENSION) -> Path:
    """Where to write `name` (may contain sub-folders) in `folder`; anything that could escape it is refused,
    a symlinked sub-folder pointing elsewhere included. (Reading follows the links ComfyUI lists.)"""
    rel = check_name(name)
    if not rel.lower().endswith(extension):
        rel += extension
    check_portable(name, rel)
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
    existing file is replaced only when `overwrite` is set (without it, checked again at the final step by a
    hard link, which fails on a name taken meanwhile; file systems without hard links leave a short race)."""
    return write_set([(path, write)], overwrite)[0]


def write_set(files: list[tuple[Path, Callable[[str], None]]], overwrite: bool) -> list[Path]:
    """The files of one model (a tower each), all or none: each is written to a temp file first, and only when
    all are written are they moved into place. A failure then puts back the files they replaced (`overwrite`)
    and removes the ones they created, so a set is never half one model and half another."""
    for path, _ in files:
        if path.exists() and not path.is_file():  # replacing it would hide a user's folder under a temp name
            raise FP8ClipError(f"{path.name} in {path.parent} is a folder, not a file. Choose another file name.")
        if path.exists() and not overwrite:
            raise FP8ClipError(f"{path.name} already exists in {path.parent}. Choose another file name, or set "
                               "'overwrite' to replace it.")
    temps: list[str] = []
    failed = [files[0][0]]  # what an error is about: the file being written, or the set being moved into place
    try:
        for path, write in files:
            failed = [path]
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(path)
            temps.append(_write_temp(path, write))
        failed = [path for path, _ in files]
        _move_all([(tmp, path) for tmp, (path, _) in zip(temps, files)], overwrite)
    except OSError as e:  # nothing was replaced (see _move_all): say what to fix
        raise FP8ClipError(f"Could not save {' and '.join(p.name for p in failed)} in {failed[0].parent}: "
                           f"{e.strerror or e}. {_OS_FIXES.get(e.errno, '')}Nothing was changed there.") from e
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [path for path, _ in files]


_OS_FIXES = {errno.ENOSPC: "Free disk space there, or save into another folder. ",
             errno.EACCES: "ComfyUI may not write into that folder: fix its permissions or save elsewhere. ",
             errno.EPERM: "ComfyUI may not write into that folder: fix its permissions or save elsewhere. ",
             errno.EROFS: "That folder is on a read-only file system: save elsewhere. ",
             errno.EFBIG: "That file system or account limits file sizes (FAT32: 4 GB): save elsewhere. "}


def _write_temp(path: Path, write: Callable[[str], None]) -> str:
    fd, tmp = create_temp(path.parent, "." + path.name + ".")
    os.close(fd)
    try:
        mode = os.stat(tmp).st_mode & 0o777  # what open() gives here
        _write_reporting_os_errors(write, tmp)
        os.chmod(tmp, mode)  # safetensors replaces the file with a 0600 one
        fd = os.open(tmp, os.O_RDWR)  # Windows cannot fsync a read-only handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _write_reporting_os_errors(write: Callable[[str], None], tmp: str) -> None:
    """safetensors reports a failed write (a full disk) as its own SafetensorError, "... (os error 28)": an
    OSError again, so the caller can say what to fix."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e


def _move_all(moves: list[tuple[str, Path]], overwrite: bool) -> None:
    placed: list[tuple[Path, str | None]] = []  # (path, where its previous file waits, if it had one)
    moving: tuple[Path, str] | None = None  # the file whose move failed, if its previous file was set aside
    try:
        for tmp, path in moves:
            backup = _set_aside(path) if overwrite and path.exists() else None
            moving = (path, backup) if backup is not None else None
            _move(tmp, path, overwrite)
            placed.append((path, backup))
            moving = None
    except BaseException as e:
        lost = []  # every previous file is tried, and each that could not be put back is named
        for path, backup in ([moving] if moving else []) + list(reversed(placed)):
            try:
                if backup is None:  # a name this save created (a failed move's own file is never touched)
                    path.unlink(missing_ok=True)
                else:
                    _restore(backup, path)
            except OSError as f:
                lost.append(f"{path.name} could not be removed ({f.strerror or f}): delete it." if backup is None
                            else f"{path.name}'s previous file could not be put back ({f.strerror or f}). It is "
                                 f"kept as {backup}: rename it to {path.name} to get it back.")
        if lost:
            raise FP8ClipError(f"Saving failed ({e}). " + " ".join(lost)) from e
        raise
    for _, backup in placed:  # the new files are in place: a backup left here is swept as stale later
        if backup is not None:
            try:
                os.unlink(backup)
            except OSError:
                pass


def _set_aside(path: Path) -> str:
    """Keep the file at `path` under a hidden name until the new one is in place (a hard link: `path` stays
    readable meanwhile; a rename where the file system has no hard links)."""
    # The time is in the name: a hard link or a rename keeps the file's old mtime, by which a concurrent save's
    # sweep would take a backup made a second ago for a stale one.
    backup = os.path.join(path.parent, f".{path.name}.{int(time.time()) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}.old")
    try:
        os.link(path, backup)
    except OSError:
        os.replace(path, backup)
    return backup


def _restore(backup: str, path: Path) -> None:
    try:
        same = os.path.samefile(backup, path)  # the move never happened: `path` is still the old file
    except OSError:
        same = False
    if same:
        os.unlink(backup)  # (renaming a hard link onto its twin would leave both names)
    else:
        os.replace(backup, path)


def _move(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name was taken meanwhile, unlike os.replace
    except FileExistsError:
        raise FP8ClipError(f"{path.name} was created by someone else while saving; nothing was "
                           "overwritten. Choose another file name.") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise FP8ClipError(f"{path.name} already exists; nothing was overwritten.") from None
        os.replace(tmp, path)


STALE_SECONDS = 3600.0


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` left by a save that was killed (power cut, kill -9): nothing else removes them, and
    each is the size of a model. Only ones untouched for an hour: a save in progress writes to its own."""
    remove_stale(path.parent, re.compile(re.escape("." + path.name + ".") + r"(?:[0-9a-f]{16}\.tmp|"
                                         r"(?P<made>[0-9a-f]{8})[0-9a-f]{8}\.old)$"))


def remove_stale(directory: Path, pattern: re.Pattern) -> None:
    """Removes the files in `directory` whose names match `pattern` and that nothing wrote for an hour (or, with
    a group `made` in the pattern, that were made an hour ago by the hex time in their name)."""
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for e in entries:
        m = pattern.match(e.name)
        if m:
            try:
                made = m.groupdict().get("made")
                when = max(e.stat(follow_symlinks=False).st_mtime, int(made, 16) if made else 0)
                if now - when > STALE_SECONDS:
                    os.unlink(e.path)
            except OSError:
                pass


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
