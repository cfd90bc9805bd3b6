"""Engines on disk: built once per key, found again, never trusted blindly.

Layout in the cache folder (ComfyUI's `models/tensorrt` by default):
    fp8clip-<tower>-<key[:24]>.engine   the serialized engine
    fp8clip-<tower>-<key[:24]>.json     its manifest: full key, what went into it, size and sha256 of the engine
    .locks/<key[:24]>.lock              one build per key at a time, across processes

An engine is used only if its manifest parses, names the same key and components, and the engine file has the
recorded size and sha256; anything else (truncated, edited, foreign, from another version) is rebuilt with a
warning and never handed to TensorRT. Files are written to a temp name and renamed, engine first and manifest
last, so a build that dies leaves no engine the cache would accept (and no temp file, unless killed -9).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..quant.errors import FP8ClipError
from ..quant.paths import create_temp, remove_stale
from .build import BuildResult

log = logging.getLogger("comfyui-fp8-clip")

CACHE_FORMAT = 1
FOLDER = "tensorrt"
EXTENSIONS = {".engine"}


def _io_ok(io: Any) -> bool:
    """The engine's inputs and outputs as TensorIO.to_dict writes them: the runner sizes its buffers from them."""
    return isinstance(io, list) and bool(io) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("mode") in ("input", "output")
        and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
        and all(isinstance(d, int) for d in t["shape"]) for t in io)


class EngineCacheError(FP8ClipError):
    """The cache folder cannot be used (missing permissions, full disk...)."""

    def __init__(self, message: str, result: BuildResult | None = None):
        super().__init__(message)
        self.result = result  # an engine built before the write failed: still usable from memory


def engine_key(components: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the engine."""
    return hashlib.sha256(json.dumps({"cache_format": CACHE_FORMAT, **components}, sort_keys=True).encode()
                          ).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CachedEngine:
    path: Path
    manifest: dict[str, Any]
    built: bool  # False: found in the cache, no build ran
    warnings: list[str] = field(default_factory=list)

    def read(self) -> bytes:
        """The engine bytes, checked against the manifest again (the file may have changed since)."""
        try:
            data = self.path.read_bytes()
        except OSError as e:  # deleted (a user, another process's rebuild) or unreadable: as for a changed file
            data, what = None, f"cannot be read now ({e.strerror or e})"
        else:
            what = "changed after it was checked"
        if data is None or len(data) != self.manifest["engine_bytes"] \
                or hashlib.sha256(data).hexdigest() != self.manifest["sha256"]:
            raise EngineCacheError(f"The engine file {self.path} {what}, and the cache holds no "
                                   "intact engine for it now. Queue the prompt again: the 'Build TensorRT Engine' "
                                   "node runs again when its engine file has changed, and rebuilds it (with the "
                                   "Quantize node's 'tensorrt' runtime, change one of that node's inputs or restart "
                                   "ComfyUI).")
        return data


def register_folder(folder_paths: Any) -> list[str]:
    """Register ComfyUI's `tensorrt` model folder for .engine files (keeping paths others registered)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    else:
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    return list(folder_paths.folder_names_and_paths[FOLDER][0])


STALE_TEMP = re.compile(r"fp8clip-.+\.(engine|json)\.[0-9a-f]{16}\.tmp$")  # what _write_atomic leaves if killed


class EngineCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _names(self, key: str, tower: str) -> tuple[Path, Path, Path]:
        stem = f"fp8clip-{tower}-{key[:24]}"
        return self.root / f"{stem}.engine", self.root / f"{stem}.json", self.root / ".locks" / f"{key[:24]}.lock"

    def check_writable(self) -> None:
        fix = ("make it writable by ComfyUI, or point the `tensorrt` entry of extra_model_paths.yaml to a "
               "writable folder.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineCacheError(f"Cannot create the TensorRT engine folder {self.root} ({e.strerror or e}): "
                                   f"create it and {fix}") from e
        try:  # a real probe: permission bits say nothing for root, read-only mounts or immutable folders
            (self.root / ".locks").mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise EngineCacheError(f"The TensorRT engine folder {self.root} is not writable ({e.strerror or e}): "
                                   f"{fix}") from e

    def check(self, key: str, components: dict[str, Any], tower: str) -> tuple[CachedEngine | None, str]:
        """(the cached engine, "") when present and intact, else (None, why not; "" when simply absent)."""
        engine, manifest_path, _ = self._names(key, tower)
        if not engine.exists() and not manifest_path.exists():
            return None, ""
        if not manifest_path.exists():
            return None, f"{engine.name} has no manifest (a build that did not finish, or a foreign file)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            return None, f"its manifest {manifest_path.name} is unreadable ({e})"
        if not isinstance(manifest, dict) or not _io_ok(manifest.get("io")):
            return None, f"its manifest {manifest_path.name} is not one this pack writes (edited?)"
        if manifest.get("cache_format") != CACHE_FORMAT or manifest.get("key") != key:
            return None, f"its manifest {manifest_path.name} is for another engine or version"
        if manifest.get("components") != json.loads(json.dumps(components)):
            return None, f"its manifest {manifest_path.name} records other build inputs"
        if not engine.exists():
            return None, f"{engine.name} is missing"
        try:
            size = engine.stat().st_size
            if size != manifest.get("engine_bytes"):
                return None, (f"{engine.name} has {size} bytes, its manifest says {manifest.get('engine_bytes')} "
                              "(truncated?)")
            if sha256_file(engine) != manifest.get("sha256"):
                return None, f"{engine.name} does not match the sha256 in its manifest (edited or corrupted)"
        except OSError as e:  # another user's file without read permission, a vanished file...
            return None, f"{engine.name} cannot be read ({e.strerror or e})"
        return CachedEngine(engine, manifest, built=False), ""

    def get_or_build(self, key: str, components: dict[str, Any], build: Callable[[], BuildResult], *,
                     tower: str, describe: dict[str, Any] | None = None,
                     check_interrupt: Callable[[], None] | None = None) -> CachedEngine:
        """The engine for `key`: from the cache when intact, else built by `build()` and stored.

        One build per key at a time: a second caller waits for the first and then uses its engine
        (`check_interrupt`, called while waiting, may raise to stop waiting: ComfyUI's cancel).
        """
        # An intact engine is used without the lock or write access: a read-only cache (a shared or baked-in
        # folder) serves its engines. Reading checks the bytes against the manifest again.
        found, _ = self.check(key, components, tower)
        if found is not None:
            return found
        self.check_writable()
        # Temp files of builds killed while writing (kill -9, power cut): engines of hundreds of MB each.
        remove_stale(self.root, STALE_TEMP)
        engine, manifest_path, lock = self._names(key, tower)
        with _build_lock(lock, check_interrupt):
            found, why = self.check(key, components, tower)
            if found is not None:
                return found
            warnings = []
            if why:
                msg = f"TensorRT engine cache: rebuilding because {why}."
                log.warning(msg)
                warnings.append(msg)
            result = build()
            manifest = {
                "cache_format": CACHE_FORMAT, "key": key, "components": components,
                "engine_file": engine.name, "engine_bytes": len(result.engine),
                "sha256": hashlib.sha256(result.engine).hexdigest(),
                "io": [t.to_dict() for t in result.plan], "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "parse_seconds": round(result.parse_seconds, 3), "build_seconds": round(result.build_seconds, 3),
                "source": describe or {},
            }
            # Engine first, manifest last: the manifest is what makes an engine valid.
            try:
                for stale in (manifest_path, engine):
                    stale.unlink(missing_ok=True)
                try:
                    _write_atomic(engine, result.engine)
                    _write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
                except BaseException:  # Ctrl-C between the two writes too: no engine without its manifest
                    engine.unlink(missing_ok=True)
                    raise
            except EngineCacheError as e:
                raise EngineCacheError(str(e), result) from e.__cause__
            except OSError as e:
                raise EngineCacheError(f"Could not replace {engine.name} in {self.root} ({e.strerror or e}).",
                                       result) from e
            return CachedEngine(engine, manifest, built=True, warnings=warnings)


@contextlib.contextmanager
def _build_lock(path: Path, check_interrupt: Callable[[], None] | None = None) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), mode=0o666)  # shared by every user of the folder
    try:
        while True:  # another process may build this key for minutes: stay cancellable meanwhile
            try:
                lock.acquire(timeout=0.5)
                break
            except Timeout:
                if check_interrupt is not None:
                    check_interrupt()
    except OSError as e:
        raise EngineCacheError(f"Cannot take the build lock {path} ({e.strerror or e}): another user's lock file? "
                               "Delete it, or make the folder's .locks writable by ComfyUI.") from e
    except NotImplementedError as e:  # filelock's answer to a file system without locks (some NFS, FUSE mounts)
        raise EngineCacheError(f"The file system of {path.parent.parent} has no file locks ({e}): point the "
                               "`tensorrt` entry of extra_model_paths.yaml to a folder on a local disk.") from e
    try:
        yield
    finally:
        lock.release()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = create_temp(path.parent, path.name + ".")  # readable by the folder's other users, as open() makes it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EngineCacheError(f"Not enough disk space to write {path.name} ({len(data) / 2**20:.0f} MB) in "
                                   f"{path.parent}. Free some space, or point the `tensorrt` entry of "
                                   "extra_model_paths.yaml to another disk; nothing was left behind.") from e
        if isinstance(e, OSError):
            raise EngineCacheError(f"Could not write {path} ({e.strerror or e}).") from e
        raise
