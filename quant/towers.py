"""Which CLIP text towers a ComfyUI CLIP object holds, and whether the pack supports them.

A ComfyUI CLIP wraps a `cond_stage_model` (SD1ClipModel, SDXLClipModel, ...) whose towers (`clip_l`,
`clip_g`) each hold a `transformer` (comfy.clip_model.CLIPTextModel). The transformer is what gets quantized
and what the patcher swaps per clone under the object-patch key `<tower>.transformer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import FP8ClipError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    label: str
    towers: tuple[str, ...]


# cond_stage_model class name -> family. Matched by exact class name: a subclass (SD2's clip_h, ...) may
# differ in what it needs, so it stays unsupported until it is tested.
FAMILIES: dict[str, Family] = {
    "SD1ClipModel": Family("SD1.5 (CLIP-L)", ("clip_l",)),
}


def supported_families_text() -> str:
    return ", ".join(f.label for f in FAMILIES.values())


@dataclass(frozen=True)
class TextTower:
    name: str  # "clip_l"; also the prefix of its layer names in patterns and reports

    @property
    def path(self) -> str:
        """Object-patch key of the transformer in `clip.patcher`."""
        return f"{self.name}.transformer"


def require_clip(clip: Any) -> None:
    if clip is None:
        raise FP8ClipError("No CLIP is connected. Connect the CLIP output of Load Checkpoint or Load CLIP.")
    if not all(hasattr(clip, a) for a in ("patcher", "cond_stage_model", "tokenize", "encode_from_tokens")):
        raise FP8ClipError(
            f"Expected a CLIP (from Load Checkpoint, Load CLIP or a LoRA loader), got {type(clip).__name__}. "
            "Connect a CLIP output to the clip input.")


def text_family(clip: Any) -> tuple[Family, list[TextTower]]:
    """The family of a CLIP and its towers; a clear error for anything else."""
    require_clip(clip)
    csm = clip.cond_stage_model
    family = FAMILIES.get(type(csm).__name__)
    if family is None:
        raise UnsupportedModelError(
            f"This CLIP ({type(csm).__name__}) is not supported yet. Supported: {supported_families_text()}. "
            "Pass this CLIP to CLIPTextEncode directly, without the FP8 node.")
    towers = [TextTower(n) for n in family.towers if getattr(csm, n, None) is not None]
    if not towers:
        raise UnsupportedModelError(f"This {family.label} CLIP holds none of its towers {family.towers}.")
    return family, towers
