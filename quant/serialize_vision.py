"""A quantized CLIP_VISION <-> one file in `fileformat`'s layout (the text towers' format and code).

The file holds the FP8 tower under `vision_model.` and the rest of ComfyUI's CLIPVisionModelProjection as it
was (`visual_projection.weight`): the key names of a standard CLIP vision file. Loading builds the CLIP_VISION
through ComfyUI's own `comfy.clip_vision.load_clipvision_from_sd`, fed the weights dequantized (it picks the
config: ViT-L, ViT-L-336, ViT-H, ViT-bigG), then fills an FP8VisionModel with the file's exact tensors and
swaps it in with `clone_with`, as `serialize.load_fp8_clip` does for text: the same outputs, bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import artifact, fileformat as ff
from .errors import FP8ClipError
from .fp8_vision_model import FP8VisionModel
from .modelopt_bridge import LayerScales
from .patching import clone_with, patched_copy, weight_bytes
from .paths import resolve_in_folder, write_atomic
from .serialize import check_load_runtime, dequantized, fill_exactly, payload, record_from_file, refuse_unsaveable

TOWER = ff.VISION_TOWERS[0]
PREFIX = TOWER + "."


def summary_text(report: dict[str, Any]) -> str:
    """The quality report of a vision file in two lines (the full one needs the live model); see
    serialize.summary_text."""
    r = ff.ReportFields(report)
    lines = [f"{r.text('model')}, {r.text('scope')}, method '{r.text('method')}'",
             f"cosine vs the unquantized encoder on {r.count('embed_cos')} held-out images (min / mean): "
             f"image_embeds {r.min_mean('embed_cos')}, penultimate hidden states {r.min_mean('hidden_cos')}"]
    return "\n".join(lines + [f"WARNING: {w}" for w in r.warnings()])


# --- saving ------------------------------------------------------------------------------------------------

def fp8_vision_tower(cv: Any) -> tuple[FP8VisionModel, artifact.QuantizedTower]:
    """The FP8 vision tower of a CLIP_VISION quantized by this pack, and its record."""
    found = artifact.quantized_towers(cv) if hasattr(cv, "patcher") else {}
    if TOWER not in found:
        raise FP8ClipError("This CLIP_VISION is not quantized by this pack. Connect the output of 'Quantize CLIP "
                           "Vision to FP8' (or 'Load FP8 CLIP Vision') to save it.")
    module, rec = found[TOWER]
    refuse_unsaveable(cv, TOWER, module, FP8VisionModel, "encoder", "CLIP_VISION",
                      "Build TensorRT Engine for FP8 CLIP Vision")
    if not isinstance(module, FP8VisionModel):  # fake-quant runtime: the same conversion as the fp8 runtime
        module = FP8VisionModel.from_quantized(module, rec.scales, rec.dtype)
    return module, rec


def file_state_dict(cv: Any, tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model under standard names: the FP8 tower plus the other parts (projection) with this
    clone's patches, taken the way the quantize node takes the tower (see patching.patched_copy)."""
    sd = {PREFIX + k: v for k, v in tower.state_dict().items()}
    for name, _ in cv.patcher.model.named_children():
        if name != TOWER:
            sd.update(patched_copy(cv, name).state_dict(prefix=name + "."))
    return sd


def save_fp8_clip_vision(cv: Any, folder: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write the quantized CLIP_VISION `cv` into `folder` (atomic; an existing file is replaced only when
    `overwrite`)."""
    from safetensors.torch import save_file

    path = resolve_in_folder(folder, name)
    if path.exists() and not overwrite:  # before the work of packing
        raise FP8ClipError(f"{path.name} already exists in {path.parent}. Choose another file name, or set "
                           "'overwrite' to replace it.")
    module, rec = fp8_vision_tower(cv)
    bundle = {"class": type(cv.patcher.model).__name__, "towers": [TOWER],
              "image_size": getattr(cv, "image_size", None)}
    tensors, header = payload(file_state_dict(cv, module), [PREFIX + k for k in rec.scales], rec, bundle,
                              ff.VISION_NOTE, summary_text(rec.report))
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header), overwrite)


# --- loading -----------------------------------------------------------------------------------------------

def build_clip_vision(tf: ff.TowerFile, name: str) -> Any:
    """ComfyUI's own CLIP_VISION for the file's dequantized weights; every tensor must find its place."""
    import comfy.clip_vision

    # Every FP8 tensor has one (unpack_tensors); the text loader's strict fill refuses strays, and here they
    # would be dropped with the tower's scales.
    outside = sorted(k for k in tf.tensors if k.endswith(ff.SCALE_SUFFIXES) and not k.startswith(PREFIX))
    if outside:
        raise FP8ClipError(f"{name}: {outside[0]} is FP8 data outside the vision tower ({len(outside)} such), which "
                           "this pack never writes; the file is damaged or was edited. Save it again.")
    sd = dequantized(tf)
    keys = set(sd)
    cv = comfy.clip_vision.load_clipvision_from_sd(sd)  # leaves only the keys it did not use in `sd`
    if cv is None:
        raise FP8ClipError(f"{name}: ComfyUI does not recognise the vision model in this file (it detects ViT-L, "
                           "ViT-H and ViT-bigG by their layer count); the file is damaged or from another model.")
    from .vision import require_clip_vision

    require_clip_vision(cv)
    missing = sorted(set(cv.model.state_dict()) - keys)
    if sd or missing:
        raise FP8ClipError(f"{name} does not match the vision model ComfyUI detected for it (unused: "
                           f"{sorted(sd)[:3]}, missing: {missing[:3]}); the file is damaged or from another model.")
    return cv


def load_fp8_clip_vision(path: str | os.PathLike, runtime: str = "auto") -> tuple[Any, ff.TowerFile]:
    """A CLIP_VISION from a file saved by `save_fp8_clip_vision`, its FP8 tower on `runtime`."""
    from .runtime import plan

    check_load_runtime(runtime)
    path = Path(path)
    tf = ff.read_tower_file(path, ff.VISION_TOWERS)
    cv = build_clip_vision(tf, path.name)
    plan(runtime, cv.patcher.load_device, kind="vision")  # a device that cannot run it: say so now
    src = cv.patcher.get_model_object(TOWER)
    scales = {k[len(PREFIX):]: LayerScales(*s) for k, s in tf.quantized.items()}
    rec = record_from_file(tf, scales, src)
    fp8 = FP8VisionModel.from_quantized(src, scales, rec.dtype)
    tower_sd = {k[len(PREFIX):]: t for k, t in tf.tensors.items() if k.startswith(PREFIX)}
    fill_exactly(fp8, tower_sd, path.name)
    artifact.attach(fp8, rec)
    fp8.configure(lambda d, requested=runtime: plan(requested, d, kind="vision"))
    device = torch.device(cv.patcher.load_device)
    fp8.load_device = device
    size = cv.patcher.model_size() + weight_bytes(fp8) - rec.source_bytes
    out = clone_with(cv, {TOWER: fp8})
    out.patcher.size = size  # what ComfyUI's memory management budgets for this clone
    return out, tf
