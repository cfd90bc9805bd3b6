"""Which CLIP text towers a ComfyUI CLIP object holds, and which parts the pack passes through.

A ComfyUI CLIP wraps a `cond_stage_model` (SD1ClipModel, SDXLClipModel, SD3ClipModel, FluxClipModel...)
whose CLIP towers (`clip_l`, `clip_g`) each hold a `transformer` (comfy.clip_model.CLIPTextModel). That
transformer is what gets quantized and what the patcher swaps per clone under `<tower>.transformer`. Other
towers of a bundle (T5-XXL in SD3/Flux, ...) are passed through untouched and named in the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import FP8ClipError, UnsupportedModelError

CLIP_TOWERS = ("clip_l", "clip_g", "clip_h")

# Bundles whose diffusion models read no pooled text output (ComfyUI's SD1.5 and SD2 models take none; only the
# GLIGEN text-box node passes it on, to its GLIGEN model); exact class names: other families subclass these.
POOLED_UNUSED = ("SD1ClipModel", "SD2ClipModel")

# First class in the bundle's MRO found here names the family (SD3 and Flux build their classes per file,
# e.g. SD3ClipModel_, so exact names would not match). The towers in the label are the ones the bundle holds:
# SD3 loads with or without T5.
FAMILY_NAMES: dict[str, str] = {
    "SDXLRefinerClipModel": "SDXL refiner",
    "SDXLClipModel": "SDXL",
    "SD3ClipModel": "SD3",
    "FluxClipModel": "Flux",
    "SD2ClipModel": "SD2",
    "SD1ClipModel": "SD1.5",
}
# Bundles whose pooled output is one tower's (first class in the MRO found here): SDXL returns CLIP-G's and
# Flux CLIP-L's; the other tower's pooled output is read by no model (SDXL checkpoints do not even hold CLIP-L's
# projection: ComfyUI leaves it uninitialized). Others (SD3: both concatenated) read every tower's.
POOLED_FROM: dict[str, tuple[str, ...]] = {"SDXLClipModel": ("clip_g",), "FluxClipModel": ("clip_l",)}
TOWER_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "CLIP-H", "t5xxl": "T5", "t5xl": "T5-XL",
                "t5base": "T5-base", "umt5xxl": "UMT5-XXL"}
TESTED = "SD1.5 CLIP-L, SD2 CLIP-H, SDXL CLIP-L + CLIP-G, SD3 CLIP-L/CLIP-G, Flux CLIP-L"


def supported_families_text() -> str:
    return f"text encoders with CLIP-L, CLIP-G or CLIP-H towers ({TESTED})"


@dataclass(frozen=True)
class TextTower:
    name: str  # "clip_l"; also the prefix of its layer names in patterns and reports

    @property
    def path(self) -> str:
        """Object-patch key of the transformer in `clip.patcher`."""
        return f"{self.name}.transformer"


@dataclass(frozen=True)
class Family:
    label: str
    towers: tuple[TextTower, ...]
    passed_through: tuple[str, ...]  # other towers of the bundle, left as they are
    pooled_used: bool = True  # False: the diffusion models of this bundle ignore its pooled output
    pooled_towers: tuple[str, ...] | None = None  # the towers whose pooled output it passes on (None: all)


def require_clip(clip: Any) -> None:
    if clip is None:
        raise FP8ClipError("No CLIP is connected. Connect the CLIP output of Load Checkpoint or Load CLIP.")
    if not all(hasattr(clip, a) for a in ("patcher", "cond_stage_model", "tokenize", "encode_from_tokens")):
        raise FP8ClipError(
            f"Expected a CLIP (from Load Checkpoint, Load CLIP or a LoRA loader), got {type(clip).__name__}. "
            "Connect a CLIP output to the clip input.")


def _is_clip_text_tower(clip: Any, name: str) -> bool:
    from .proxy import unwrap

    try:  # through object patches: the shared model may hold another clone's FP8 tower right now
        transformer = unwrap(clip.patcher.get_model_object(f"{name}.transformer"))
    except AttributeError:
        return False
    from .artifact import record_of

    # A tower this pack quantized was a CLIP text tower, whatever runs it now (a TensorRT engine has no
    # encoder): recognising it lets the quantize node say "already quantized" instead of "no CLIP tower".
    return record_of(transformer) is not None or hasattr(getattr(transformer, "text_model", None), "encoder")


def text_family(clip: Any) -> tuple[Family, list[TextTower]]:
    """The family of a CLIP and its CLIP text towers; a clear error when it has none."""
    require_clip(clip)
    csm = clip.cond_stage_model
    towers = []
    for name in CLIP_TOWERS:
        if getattr(csm, name, None) is not None and _is_clip_text_tower(clip, name):
            towers.append(TextTower(name))
    # Every other encoder of the bundle (T5, Llama, Qwen...) is passed through: named so, whatever it is called.
    others = [n for n, _ in csm.named_children() if n not in {t.name for t in towers}]
    if not towers:
        raise UnsupportedModelError(
            f"This text encoder ({type(csm).__name__}) has no CLIP text tower, so there is nothing for this node "
            f"to quantize. Supported: {supported_families_text()}. Pass this CLIP to CLIPTextEncode directly.")
    name = next((FAMILY_NAMES[c.__name__] for c in type(csm).__mro__ if c.__name__ in FAMILY_NAMES), None)
    if name is None or name == "SD1.5" and (type(csm).__name__ != "SD1ClipModel" or others):
        name = type(csm).__name__  # SD1ClipModel is also the base of other families' bundles (Kandinsky 5...)
    label = f"{name} ({' + '.join(TOWER_LABELS.get(n, n) for n in [t.name for t in towers] + others)})"
    pooled_from = next((POOLED_FROM[c.__name__] for c in type(csm).__mro__ if c.__name__ in POOLED_FROM), None)
    return Family(label, tuple(towers), tuple(others), type(csm).__name__ not in POOLED_UNUSED, pooled_from), towers
