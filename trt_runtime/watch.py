"""When a TensorRT node must run again although its inputs did not change: ComfyUI's IS_CHANGED.

ComfyUI reuses a node's output while its inputs stay the same. An engine file deleted, damaged, or rebuilt by
another process after the node ran would surface only at the next encode and need an input change or a restart
to fix. The watch gives ComfyUI a token per node that changes when the files the node used change, and only then:
an unchanged token keeps ComfyUI's cache (and everything downstream of the node) as it is.
"""
from __future__ import annotations

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


class EngineWatch:
    def __init__(self) -> None:
        self._nodes: dict[str, tuple[State, int]] = {}

    def ran(self, node_id: str | None, paths: Iterable[Path]) -> None:
        """The node `node_id` ran and its output uses the engine files `paths`."""
        if node_id is not None:
            self._nodes[node_id] = (file_states(paths), self._nodes.get(node_id, ((), 0))[1])

    def token(self, node_id: str | None) -> str:
        """Stays the same while the files the node used last are as it left them."""
        states, generation = self._nodes.get(node_id, ((), 0))
        now = file_states(Path(p) for p, _, _ in states)
        if now != states:
            generation += 1
            self._nodes[node_id] = (now, generation)  # one change, one new token
        return str(generation)
