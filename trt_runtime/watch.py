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

State = tuple[tuple[str, int, int], ...]


def file_states(paths: Iterable[Path]) -> State:
    """(path, size, mtime in ns) per file; -1, -1 for a file that is gone."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1))
    return tuple(out)


@dataclass
class EngineUse:
    """What one run of an engine node used: the engine files its output runs on, and whether it fell back for
    a reason a later run may not meet (`retry`)."""
    paths: list[Path] = field(default_factory=list)
    retry: bool = False


class EngineWatch:
    def __init__(self) -> None:
        self._nodes: dict[str, tuple[State, int, bool]] = {}

    def ran(self, node_id: str | None, use: EngineUse) -> None:
        """The node `node_id` ran; `use` says what its output runs on."""
        if node_id is not None:
            self._nodes[node_id] = (file_states(use.paths), self._nodes.get(node_id, ((), 0, False))[1], use.retry)

    def token(self, node_id: str | None) -> str:
        """Stays the same while the files the node used last are as it left them, and it did not fall back for
        a reason that may pass."""
        states, generation, retry = self._nodes.get(node_id, ((), 0, False))
        now = file_states(Path(p) for p, _, _ in states)
        if now != states or retry:
            generation += 1
            self._nodes[node_id] = (now, generation, retry)  # one change, one new token
        return str(generation)
