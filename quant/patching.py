"""Copying a tower out of a CLIP with its LoRA patches baked in, and swapping it into a clone.

`CLIP.clone()` shares `cond_stage_model`; a module assigned into it would leak into the input CLIP and every
other clone. The swap therefore goes through `patcher.add_object_patch`, which ComfyUI applies while that
clone is loaded and undoes afterwards.
"""
from __future__ import annotations

import copy
import uuid
from typing import Any

import torch


def patched_copy(clip: Any, path: str) -> torch.nn.Module:
    """A private copy of the module at `path` with this clone's weight patches (LoRA, merges) applied.

    The weights come from `get_key_patches`, which returns the unpatched original (from ComfyUI's backup when
    some other clone is loaded and patched in place) plus this clone's patches, so the copy is right whichever
    clone ran last.
    """
    import comfy.lora

    src = clip.patcher.get_model_object(path)
    module = copy.deepcopy(src)
    for m in module.modules():  # drop ComfyUI's lowvram/LoRA hooks that the deep copy carried over
        if hasattr(m, "weight_function"):
            m.weight_function = []
        if hasattr(m, "bias_function"):
            m.bias_function = []
    prefix = path + "."
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        for key, entries in clip.patcher.get_key_patches(prefix).items():
            name = key[len(prefix):]
            target = params.get(name)
            if target is None:
                continue
            weight, convert = entries[0]
            w = convert(weight.to(device=target.device, dtype=torch.float32, copy=True), inplace=True)
            if len(entries) > 1:
                w = comfy.lora.calculate_weight(entries[1:], w, key)
            target.copy_(w.to(target.dtype))
    return module


def clone_with(clip: Any, modules: dict[str, torch.nn.Module]) -> Any:
    """A clone of `clip` whose modules at the given paths are replaced (for this clone only).

    Weight patches under those paths are dropped from the clone: they are already in the new modules.
    """
    out = clip.clone()
    for path, module in modules.items():
        prefix = path + "."
        for key in [k for k in out.patcher.patches if k.startswith(prefix)]:
            del out.patcher.patches[key]
        out.patcher.add_object_patch(path, module)
    out.patcher.patches_uuid = uuid.uuid4()  # patches changed: never reuse weights patched for the source
    return out
