"""Room on the GPU for tensors ComfyUI does not place itself, asked of ComfyUI's model management first.

The pack puts tensors on the GPU that ComfyUI's loader never sees: a tower's calibration copy (fp32), the FP8
towers behind their proxies, the quality report's reference weights. ComfyUI frees memory only for what it
loads, so where its budget is tight these met its models and failed with CUDA out of memory (SDXL on an
emulated 8 GB card, the quantize node added to a workflow that had run: bench/results/small_vram_h100.md).
Asking first lets ComfyUI unload or partly offload other models (the UNet), as it does for its own loads.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def make_room(nbytes: int, device: Any, keep: Iterable[Any] = ()) -> None:
    """Have ComfyUI free `nbytes` on `device` plus its own inference reserve (`--reserve-vram` included),
    unloading other models if it must, never the models of the patchers in `keep` (the one running now)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta") or nbytes <= 0:  # meta: no memory (tests stand it in for a GPU)
        return
    try:
        import comfy.model_management as mm
    except ImportError:  # the command line: no models but ours
        return
    keep = tuple(keep)
    keep_loaded = [lm for lm in mm.current_loaded_models if any(lm.model is k for k in keep)]
    mm.free_memory(nbytes + mm.minimum_inference_memory(), device, keep_loaded=keep_loaded)


def holders(module: Any) -> list[Any]:
    """The loaded patchers (ComfyUI's `current_loaded_models`) that have `module` patched in."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return []
    return [lm.model for lm in mm.current_loaded_models
            if lm.model is not None and any(o is module for o in getattr(lm.model, "object_patches", {}).values())]
