"""Copying a tower out of a CLIP with its LoRA patches baked in, and swapping it into a clone.

`CLIP.clone()` shares `cond_stage_model`; a module assigned into it would leak into the input CLIP and every
other clone. The swap therefore goes through `patcher.add_object_patch`, which ComfyUI applies while that
clone is loaded and undoes afterwards.
"""
from __future__ import annotations

import copy
import uuid
from typing import Any, Sequence

import torch


# What ComfyUI's loader hangs on modules of a loaded model: LoRA hooks and, with v0.29's dynamic VRAM, virtual
# VRAM allocations and registered host buffers (which reference other modules). They belong to the live model:
# deep-copying them fails ("CUDA error: invalid argument" once the CLIP has encoded) or drags the patcher along.
# (`_v_weight` is a view of virtual VRAM whose pages may be evicted: cloning it fails.)
LOADER_ATTRS = ("_v", "weight_lowvram_function", "bias_lowvram_function", "weight_function", "bias_function")
LOADER_PREFIXES = ("_v_", "_pin")  # _v_weight, _v_signature...; _pin_state, _pins


def _loader_attrs(m: torch.nn.Module) -> list[str]:
    return [a for a in m.__dict__ if a in LOADER_ATTRS or a.startswith(LOADER_PREFIXES)]


def module_copy(src: torch.nn.Module, device: Any = None) -> torch.nn.Module:
    """A deep copy of `src` without the loader's attachments (the module classes' own defaults apply), its
    tensors made on `device` (default: where they are): no second copy on the GPU the model is loaded on."""
    memo: dict[int, Any] = {}
    if device is not None:
        for t in (*src.parameters(), *src.buffers()):
            c = t.detach().to(device, copy=True)
            memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                else c
    for m in src.modules():
        for a in _loader_attrs(m):
            v = m.__dict__[a]
            # The memo maps objects by identity: never shared ones (None, True, small ints, ()), or every
            # occurrence of them in the copy would turn into None.
            if not (v is None or isinstance(v, (bool, int, float, str, bytes)) or isinstance(v, tuple) and not v):
                memo[id(v)] = None
    module = copy.deepcopy(src, memo)
    for m in module.modules():
        for a in _loader_attrs(m):
            del m.__dict__[a]
    return module


def patched_copy(clip: Any, path: str) -> torch.nn.Module:
    """A private copy of the module at `path` with this clone's weight patches (LoRA, merges) applied, on the
    offload device (the GPU gets it through the tower's proxy, which first asks ComfyUI for the room).

    Whatever clone ran last may still be patched into the shared model: its object patches (another FP8
    tower) and its in-place weight patches (another LoRA). So the module comes from `get_model_object`
    (which looks through object patches to the original) and each weight from ComfyUI's backup when it was
    patched in place, then this clone's own patches are applied.
    """
    import comfy.lora

    from .proxy import unwrap

    module = module_copy(unwrap(clip.patcher.get_model_object(path)), clip.patcher.offload_device)
    backup = getattr(clip.patcher, "backup", {})
    patches = clip.patcher.patches
    with torch.no_grad():
        for name, target in [*module.named_parameters(), *module.named_buffers()]:
            key = f"{path}.{name}"
            original = backup[key].weight if key in backup else None
            own = patches.get(key)
            if original is None and not own:
                continue
            w = (original if original is not None else target).to(target.device, torch.float32, copy=True)
            if own:
                w = comfy.lora.calculate_weight(own, w, key)
            target.copy_(w.to(target.dtype))
    return module


def weights_fingerprint(patcher: Any, paths: Sequence[str], samples: int = 16) -> str:
    """A digest of the weights `patched_copy` would start from at `paths` (ComfyUI's backup where a clone's
    patches are in place, else the live tensor), from `samples` evenly spaced values of each tensor: a remembered
    calibration must not be reused once a node has changed the model's weights in place (load_sd, a merge
    written into it), which keeps the CLIP object and its patches_uuid. One copy to the CPU per call."""
    import hashlib

    from .proxy import unwrap

    backup = getattr(patcher, "backup", {})
    picks = []
    for path in paths:
        module = unwrap(patcher.get_model_object(path))
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            key = f"{path}.{name}"
            t = backup[key].weight if key in backup else t
            if t.is_floating_point() and t.numel() and t.device.type != "meta":
                flat = t.detach().reshape(-1)
                picks.append(flat[:: max(1, flat.numel() // samples)][:samples].float())
    # One copy per device, put back in the model's order: the digest must not depend on where ComfyUI placed
    # each weight (a partial load splits them).
    groups: dict[torch.device, list[int]] = {}
    for i, x in enumerate(picks):
        groups.setdefault(x.device, []).append(i)
    on_cpu: list[torch.Tensor] = [torch.empty(0)] * len(picks)
    for idx in groups.values():
        joined = torch.cat([picks[i] for i in idx]).cpu()
        for i, part in zip(idx, joined.split([picks[i].numel() for i in idx])):
            on_cpu[i] = part
    return hashlib.sha256(torch.cat(on_cpu).numpy().tobytes() if on_cpu else b"").hexdigest()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights (ModelOpt's quantizer state excluded: it is not part of the model)."""
    return sum(t.nbytes for k, t in module.state_dict().items() if "_quantizer" not in k)


ROW_SCALES = "_fp8clip_row_scales"  # attribute of a Q->DQ token table: the per-row scales it was made with


def fake_quant_embedding(module: torch.nn.Module) -> None:
    """Q->DQ the token embedding table with one FP8 scale per row, as FP8Embedding stores it."""
    from .fp8_ops import FP8Embedding

    tok = module.get_input_embeddings()
    with torch.no_grad():
        q = FP8Embedding(tok.weight)
        tok.weight.copy_((q.weight.float() * q.weight_scale.unsqueeze(1)).to(tok.weight.dtype))
    # The FP8 runtime's table must hold these very scales (FP8Embedding's `scale`): kept beside the table.
    setattr(tok, ROW_SCALES, q.weight_scale.detach())


def row_scales_of(tok: torch.nn.Module) -> torch.Tensor | None:
    """The per-row scales `fake_quant_embedding` made `tok`'s table with; None for a table it did not make."""
    return getattr(tok, ROW_SCALES, None)


HIGH_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def checkpoint_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ComfyUI holds `module`'s weights in (fp16 by default, fp32 with --fp32-text-enc...), for the
    parts an FP8 model keeps in high precision. FP8 weights (--fp8_e4m3fn-text-enc) give fp16: their values
    exactly."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            return m.weight.dtype if m.weight.dtype in HIGH_PRECISION else torch.float16
    return torch.float16


def to_float32(module: torch.nn.Module) -> torch.nn.Module:
    """fp32 weights for calibration: folded Q->DQ weights then hold the exact FP8 values times their scale
    (in fp16 they would be rounded again, and the real FP8 runtime would drift from the measured numbers)."""
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return module


def clone_with(clip: Any, modules: dict[str, torch.nn.Module]) -> Any:
    """A clone of `clip` (a CLIP or CLIP_VISION) whose modules at the given paths are replaced, for this
    clone only. Weight patches under those paths are dropped from the clone: they are in the new modules.
    """
    if hasattr(clip, "clone"):
        out = clip.clone()
    else:  # ComfyUI's ClipVisionModel has no clone(): a shallow copy with its own patcher clone
        out = copy.copy(clip)
        out.patcher = clip.patcher.clone()
    from comfy.patcher_extension import CallbacksMP

    from .proxy import RefuseLaterWeightPatches, TowerProxy, original_of, unwrap

    group = object()  # this CLIP's towers share the GPU (proxy.TowerProxy)
    # Whether ComfyUI may treat the shared model's weights as this clone's and its source's alike: only when the
    # source computes with quantized towers at these paths too (an FP8 runtime made from the Q->DQ clone). Else
    # (the source runs the original towers, or had weight patches under them) a new patch id makes ComfyUI load
    # the model again at a switch between the two: with the source's id, loading the clone (which leaves the
    # original towers out) counts the model as loaded, and the source would then run its towers from wherever
    # they were, streamed from the CPU each encode (CLIP-L: 96 ms instead of 10 on an H100).
    same_weights = all(isinstance(clip.patcher.object_patches.get(path), TowerProxy) for path in modules)
    for path, module in modules.items():
        prefix = path + "."
        for key in [k for k in out.patcher.patches if k.startswith(prefix)]:
            del out.patcher.patches[key]
            same_weights = False
        # get_model_object gives this clone's object patch (maybe a proxy) or the shared model's module (maybe
        # another clone's proxy, patched in while that clone is loaded); either way its original is the tower.
        original = original_of(out.patcher.get_model_object(path))
        proxy = TowerProxy(unwrap(module), original, out.patcher.load_device, out.patcher.offload_device, group)
        out.patcher.add_object_patch(path, proxy)
        # Keyed by path: the callbacks of the tower this one replaces (and the memory they hold) go.
        key = f"fp8clip:{path}"
        for call_type, cb in ((CallbacksMP.ON_DETACH, proxy.offload),
                              (CallbacksMP.ON_LOAD, RefuseLaterWeightPatches(path))):
            out.patcher.remove_callbacks_with_key(call_type, key)
            out.patcher.add_callback_with_key(call_type, key, cb)
    if not same_weights:
        out.patcher.patches_uuid = uuid.uuid4()
    return out
