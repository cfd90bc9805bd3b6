"""Launcher for the pack's command line: `python -m fp8clip ...` from the pack folder, or `python <pack folder> ...`.

The pack folder (comfyui-fp8-clip) is not a valid module name, and its sub-packages use relative imports, so
this registers the folder as the package `comfyui_fp8_clip` (without running its ComfyUI `__init__.py`) and
runs `cli.main`.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
PACKAGE = "comfyui_fp8_clip"


def load_pack() -> types.ModuleType:
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        # As launched, links kept: a pack symlinked into custom_nodes still finds the ComfyUI around it (cli.py)
        here = Path(__file__).absolute().parent
        pkg.__path__ = [str(here)]
        pkg.__file__ = str(here / "__init__.py")
        sys.modules[PACKAGE] = pkg
    # The pack folder on sys.path would shadow ComfyUI's own top-level `nodes` module with the pack's nodes/.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACK_DIR]
    return sys.modules[PACKAGE]


def main(argv: list[str] | None = None) -> int:
    load_pack()
    return importlib.import_module(PACKAGE + ".cli").main(argv)


if __name__ == "__main__":
    sys.exit(main())
