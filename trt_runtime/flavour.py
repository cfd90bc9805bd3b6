"""Which TensorRT Python API is installed: standard TensorRT (`tensorrt`) first, else TensorRT for RTX.

Both expose the same builder/runtime API under different module names; engines of one cannot be read by the
other, so the flavour and its version are part of every engine cache key.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

STANDARD = "tensorrt"
RTX = "tensorrt-rtx"

INSTALL_HINT = ("Install TensorRT for RTX into ComfyUI's Python: `pip install tensorrt-rtx-cu13-libs "
                "tensorrt-rtx-cu13-bindings` (GeForce/RTX, compute capability 8.9 or 12.x), or standard "
                "TensorRT 10.2+ (`pip install tensorrt`; Ada, Hopper, Blackwell).")


@dataclass(frozen=True)
class Flavour:
    name: str  # STANDARD | RTX
    module: Any
    version: str

    @property
    def label(self) -> str:
        return f"{'TensorRT' if self.name == STANDARD else 'TensorRT for RTX'} {self.version}"


# The oldest standard TensorRT accepted: strongly typed networks (the creation flag build.py uses) with FP8
# Q/DQ. No standard TensorRT could be installed here to test any version.
MIN_STANDARD = (10, 2)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _try(module_name: str) -> tuple[Any | None, str]:
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (stub wheels raise all sorts of errors on import)
        return None, f"{module_name}: {type(e).__name__}: {e}"
    if not hasattr(mod, "Builder"):
        return None, f"{module_name}: imported but has no Builder (a stub package?)"
    version = str(getattr(mod, "__version__", "unknown"))
    if module_name == "tensorrt" and version != "unknown" and _version_tuple(version) < MIN_STANDARD:
        return None, (f"tensorrt {version} is older than 10.2, which FP8 engines need: `pip install -U tensorrt`"
                      " (or remove it, and TensorRT for RTX is used where installed)")
    return mod, ""


def find_tensorrt(prefer: str | None = None) -> tuple[Flavour | None, str]:
    """(flavour, "") for the first importable TensorRT, or (None, why not and how to install one)."""
    order = [(STANDARD, "tensorrt"), (RTX, "tensorrt_rtx_bindings")]
    if prefer == RTX:
        order.reverse()
    errors = []
    for name, module_name in order:
        mod, err = _try(module_name)
        if mod is not None:
            return Flavour(name, mod, str(getattr(mod, "__version__", "unknown"))), ""
        errors.append(err)
    return None, f"No TensorRT is installed ({'; '.join(errors)}). {INSTALL_HINT}"
