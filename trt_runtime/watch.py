"""When a TensorRT node must run again although its inputs did not change: ComfyUI's IS_CHANGED.

ComfyUI reuses a node's output while its inputs stay the same. An engine file deleted, damaged, or rebuilt by
another process after the node ran would surface only at the next encode and need an input change or a restart
to fix. The watch gives ComfyUI a token per node that changes when the files the node used change, and only then:
an unchanged token keeps ComfyUI's cache (and everything downstream of the node) as it is. A node that fell
back because its engine could not be built or loaded (GPU memory taken, a folder not writable...) gets a new
token at every queue instead: queuing again retries, as after a node that failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

State = dict[str, tuple[int, int]]

# Engine files watched per node id. One id is often several workflows' nodes (ids are per workflow), and
# ComfyUI's cache (v0.29's default RAM-pressure cache, --cache-lru) keeps each one's output: the files of a
# node id's recent runs are all watched, so a change to any of them runs the node again (an extra run only
# finds its engine in the cache). Bounded: a long session queues many shapes.
KEEP_FILES = 32


def file_states(paths: Iterable[Path]) -> State:
    """{path: (size, mtime in ns)} per file; (-1, -1) for a file that is gone."""
    out = {}
    for p in paths:
        try:
            st = Path(p).stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[str(p)] = (-1, -1)
    return out


@dataclass
class EngineUse:
    """What one run of an engine node used: the engine files its output runs on, and whether it fell back for
    a reason a later run may not meet (`retry`)."""
    paths: list[Path] = field(default_factory=list)
    retry: bool = False


@dataclass
class _Watched:
    files: State = field(default_factory=dict)  # oldest first
    generation: int = 0
    retry: bool = False


class EngineWatch:
    def __init__(self) -> None:
        self._nodes: dict[str, _Watched] = {}

    def ran(self, node_id: str | None, use: EngineUse) -> None:
        """The node `node_id` ran; `use` says what its output runs on."""
        if node_id is None:
            return
        w = self._nodes.setdefault(node_id, _Watched())
        for path, state in file_states(use.paths).items():
            w.files.pop(path, None)
            w.files[path] = state
        for path in list(w.files)[:-KEEP_FILES]:
            del w.files[path]
        w.retry = use.retry

    def token(self, node_id: str | None) -> str:
        """Stays the same while the files of the node id's recent runs are as they were left, and its last run
        did not fall back for a reason that may pass."""
        w = self._nodes.get(node_id) if node_id is not None else None
        if w is None:
            return "0"
        now = file_states(Path(p) for p in w.files)
        if now != w.files or w.retry:
            w.generation += 1  # one change, one new token
            w.files = now
        return str(w.generation)
