"""The record a quantized tower carries from calibration to every runtime and file writer.

It rides on the quantized module itself (`module.fp8clip`), so it travels with the object patch through
every clone, CLIPSetLastLayer and LoRA node without the CLIP object having to know about it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .modelopt_bridge import LayerScales
from .recipe import Recipe

ATTR = "fp8clip"


@dataclass
class QuantizedTower:
    family: str
    tower: str  # "clip_l"
    recipe: Recipe
    fingerprint: str  # calibration prompts + recipe
    scales: dict[str, LayerScales]  # layer name inside the tower module -> scales
    kept: list[str]  # layer names inside the tower module left in high precision
    source_bytes: int = 0  # the original tower's weights, for ComfyUI's memory accounting
    report: dict[str, Any] = field(default_factory=dict)
    # ComfyUI's dtype for this tower's weights (patching.checkpoint_dtype): what the FP8 model keeps in high
    # precision (kept layers, a token table not in FP8) stays in it, the calibrated fp32 copy's values exactly.
    dtype: torch.dtype = torch.float16


def attach(module: torch.nn.Module, record: QuantizedTower) -> None:
    object.__setattr__(module, ATTR, record)


def record_of(module: Any) -> QuantizedTower | None:
    from .proxy import unwrap

    return unwrap(module).__dict__.get(ATTR) if isinstance(unwrap(module), torch.nn.Module) else None


def quantized_towers(clip: Any) -> dict[str, tuple[torch.nn.Module, QuantizedTower]]:
    """Object-patch path -> (quantized module, record) for every tower of `clip` quantized by this pack."""
    from .proxy import unwrap

    out = {}
    for path, obj in getattr(clip.patcher, "object_patches", {}).items():
        rec = record_of(obj)
        if rec is not None:
            out[path] = (unwrap(obj), rec)
    return out
