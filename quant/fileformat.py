"""The on-disk layout of a saved FP8 CLIP tower: plain tensors and header strings, no ComfyUI, no pickle.

One file per text tower, with the key names of a standard CLIP text-encoder file (`text_model.encoder.
layers.0.self_attn.q_proj.weight`, ...), so that every stock loader routes it to the right tower. A CLIP
vision model is one file too: its tower under `vision_model.` plus the rest of the model as it was
(`visual_projection.weight`), the key names of a standard CLIP vision file. Per
quantized Linear, ComfyUI's quantized layout (comfy/quant_ops.py, QUANTIZATION.md):

    <layer>.weight        float8_e4m3fn
    <layer>.weight_scale  float32 scalar, amax / 448 (dequantized weight = weight * weight_scale)
    <layer>.input_scale   float32 scalar (weights+activations only)
    <layer>.input_scale_inv  float32 scalar, 448 / amax: what inputs are multiplied by before rounding to FP8,
                          exactly as ModelOpt calibrated it (1 / input_scale can be an ulp off); format 2
    <layer>.comfy_quant   uint8 bytes of JSON {"format": "float8_e4m3fn"}
    <layer>.bias          float32

and the header key `_quantization_metadata` listing those layers. Layers kept in high precision, layer norms
and the position embedding are stored as they are. The token embedding may be FP8 with one scale per row
(`weight_scale` of shape [rows]), a layout ComfyUI does not define, so it gets no `comfy_quant`.

Never silently wrong: stock ComfyUI (v0.3.75, v0.29) drops the scales of quantized CLIP-L/G weights and
would produce wrong embeddings (cosine 0.5) without a word. Every FP8 tensor is therefore stored FLATTENED
(1-D); its shape is in the header (`fp8clip.layout`). A loader that does not know the scales hits PyTorch's
shape check ("size mismatch for text_model...weight") and fails; this pack's loader restores the shapes.
A damaged file is refused too: the header holds a SHA-256 of the tensors (`fp8clip.sha256`).
A file that holds no FP8 tensor is an ordinary high-precision file that stock loaders read correctly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import FP8ClipError
from .fidelity import worst

FORMAT_KEY = "fp8clip.format"
FORMAT_VERSION = 2  # 2: input_scale_inv stored (format 1 files load, deriving it)
FP8 = torch.float8_e4m3fn
COMFY_FORMAT = "float8_e4m3fn"
TEXT_TOWERS = ("clip_l", "clip_g", "clip_h")
VISION_TOWERS = ("vision_model",)  # the object-patch path of the tower inside ComfyUI's CLIPVisionModelProjection
KNOWN_TOWERS = TEXT_TOWERS + VISION_TOWERS
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".input_scale_inv")  # beside the FP8 weight of a layer

# Header keys (all values are strings: safetensors metadata is str -> str).
H_FAMILY = "fp8clip.family"
H_TOWER = "fp8clip.tower"
H_BUNDLE = "fp8clip.bundle"  # JSON {"class": cond_stage_model class, "towers": [...], "clip_type": ...}
H_RECIPE = "fp8clip.recipe"
H_FINGERPRINT = "fp8clip.fingerprint"
H_KEPT = "fp8clip.kept"
H_REPORT = "fp8clip.report"
H_REPORT_TEXT = "fp8clip.report_text"
H_VERSIONS = "fp8clip.versions"
H_LAYOUT = "fp8clip.layout"
H_NOTE = "fp8clip.note"
H_STOCK = "fp8clip.stock_compatible"  # set on weights-only exports: JSON with their measured quality
H_DIGEST = "fp8clip.sha256"  # of the tensors (tensor_digest); files saved before it load unchecked
COMFY_QUANT_HEADER = "_quantization_metadata"

NOTE = ("FP8 CLIP text encoder saved by comfyui-fp8-clip. Load it with the 'Load FP8 CLIP' node of that pack. "
        "FP8 weights are stored flattened with their scales next to them, so loaders that would ignore the "
        "scales fail instead of producing wrong embeddings.")
VISION_NOTE = ("FP8 CLIP vision model saved by comfyui-fp8-clip. Load it with the 'Load FP8 CLIP Vision' node of "
               "that pack. FP8 weights are stored flattened with their scales next to them, so loaders that would "
               "ignore the scales fail instead of producing wrong image embeddings.")
STOCK_NOTE = ("Weights-only FP8 CLIP text encoder exported by comfyui-fp8-clip for stock loaders (Load CLIP, "
              "DualCLIPLoader): FP8 weights without scales, read as ComfyUI's --fp8_e4m3fn-text-enc would. "
              "Measured quality in fp8clip.stock_compatible.")


def comfy_quant_tensor(conf: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The per-layer `comfy_quant` entry exactly as ComfyUI writes it (json.dumps, utf-8, uint8)."""
    return torch.tensor(list(json.dumps(dict(conf or {"format": COMFY_FORMAT})).encode("utf-8")), dtype=torch.uint8)


class ReportFields:
    """Reads a saved quality report (header JSON, which may have been edited) for display, never failing."""

    def __init__(self, report: Any) -> None:
        self.r = report if isinstance(report, dict) else {}

    def text(self, key: str) -> str:
        v = self.r.get(key)
        return v if isinstance(v, str) else "?"

    def number(self, key: str) -> str:
        v = self.r.get(key)
        return "n/a" if v is None else f"{v:.4f}" if _is_number(v) else "?"

    def count(self, key: str) -> str:
        v = self.r.get(key, [])
        return str(len(v)) if isinstance(v, list) else "?"

    def min_mean(self, key: str) -> str:
        v = self.r.get(key) or []
        if not isinstance(v, list) or not all(_is_number(x) for x in v):
            return "?"
        if not v:
            return "n/a"
        return f"{worst(v):.4f} / {sum(v) / len(v):.4f}"

    def warnings(self) -> list[str]:
        v = self.r.get("warnings", [])
        return [w for w in v if isinstance(w, str)] if isinstance(v, list) else []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TowerFile:
    """Everything a tower file holds: exact tensors (shapes restored) plus what the header says."""
    tower: str
    family: str
    tensors: dict[str, torch.Tensor]  # module state dict of the FP8 tower, keys as in the file
    quantized: dict[str, tuple[float, float | None, float | None]]  # layer -> (weight_scale, input_scale, inv)
    rowwise: list[str]  # FP8 tensors with one scale per row (the token embedding)
    header: dict[str, str] = field(default_factory=dict)

    def meta(self, key: str, default: Any = None) -> Any:
        v = self.header.get(key)
        return default if v is None else json.loads(v)

    @property
    def fp8_embedding(self) -> bool:
        return "text_model.embeddings.token_embedding.weight" in self.rowwise

    @property
    def bundle(self) -> dict[str, Any]:
        return self.meta(H_BUNDLE, {}) or {}

    @property
    def report(self) -> dict[str, Any]:
        return self.meta(H_REPORT, {}) or {}


# --- writing -----------------------------------------------------------------------------------------------

def pack_tensors(state_dict: Mapping[str, torch.Tensor], quantized_layers: Iterable[str]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """FP8 tower state dict -> (file tensors, fp8clip.layout, ComfyUI's _quantization_metadata).

    `quantized_layers`: Linear layers whose `weight` is FP8 with per-tensor `weight_scale`."""
    layers = sorted(quantized_layers)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for key, t in state_dict.items():
        t = t.detach().to("cpu")
        if t.dtype == FP8:
            scale = state_dict.get(key[: -len("weight")] + "weight_scale") if key.endswith(".weight") else None
            if scale is None:
                raise FP8ClipError(f"Cannot save {key}: it is FP8 but has no weight_scale next to it.")
            layout[key] = {"shape": list(t.shape), "scale": "per-tensor" if scale.numel() == 1 else "per-row"}
            t = t.reshape(-1)
        tensors[key] = t.contiguous()
    for layer in layers:
        if layout.get(layer + ".weight", {}).get("scale") != "per-tensor":
            raise FP8ClipError(f"Cannot save layer {layer}: its weight is not FP8 with one scale.")
        tensors[layer + ".comfy_quant"] = comfy_quant_tensor()
    comfy_meta = {"format_version": "1.0", "layers": {layer: {"format": COMFY_FORMAT} for layer in layers}}
    return tensors, layout, comfy_meta


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a file's tensors (names, dtypes, shapes, bytes). safetensors keeps no checksum, and a file
    whose tail was zeroed (an interrupted copy into a preallocated file) loaded and encoded wrong."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def header_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as safetensors needs them: strings; anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in values.items()}


# --- reading -----------------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, checked against the file size. Reads only the header,
    so a truncated or corrupt file gets a message that says so before any tensor is touched."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise FP8ClipError(f"{name} is not a .safetensors file. Only safetensors files are read (pickle-based "
                           ".ckpt/.pt/.bin files can run code when loaded).")
    if not path.is_file():
        raise FP8ClipError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}.")
    size = path.stat().st_size
    broken = (f"{name} is not a readable safetensors file ({{}}). It is truncated or corrupt: download or save "
              "it again.")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FP8ClipError(broken.format(f"{size} bytes, shorter than a safetensors header"))
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise FP8ClipError(broken.format(f"header length {n} does not fit in its {size} bytes"))
        raw = f.read(n)
    try:
        entries = json.loads(raw.decode("utf-8"))
        if not isinstance(entries, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise FP8ClipError(broken.format(f"its header is not valid JSON: {e}")) from None
    meta = entries.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FP8ClipError(broken.format("its metadata is not a map of strings"))
    end = 0
    for k, e in entries.items():
        try:
            start, stop = e["data_offsets"]
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError):
            raise FP8ClipError(broken.format(f"tensor {k!r} has no valid data_offsets")) from None
    if 8 + n + end > size:
        raise FP8ClipError(broken.format(f"the header describes {8 + n + end} bytes but the file has {size}"))
    return entries, meta


def describe_foreign(name: str, keys: Iterable[str], dtypes: Iterable[str], towers: tuple[str, ...] = TEXT_TOWERS
                     ) -> str:
    """Why a safetensors file without this pack's header cannot be loaded here, and what to use instead."""
    keys = list(keys)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    vision = towers == VISION_TOWERS
    what, saver = ("a CLIP vision model", "'Save FP8 CLIP Vision'") if vision else ("a CLIP text encoder",
                                                                                    "'Save FP8 CLIP'")
    text = has("text_model.encoder.layers.") or (has("transformer.resblocks.") and not has("visual."))
    image = has("vision_model.") or has("visual.")
    quantized = any(k.endswith(("comfy_quant", "weight_scale", "scale_weight")) for k in keys) or \
        "F8_E4M3" in set(dtypes)
    kind = "quantized " if quantized else ""
    # The wrong kind of model first (a stock-compatible FP8 text export in the vision loader...): the fix is
    # another loader, whatever its weights' format.
    if vision and text and not image:
        return (f"{name} is a {kind}CLIP text encoder, not a CLIP vision model. Load it with 'Load CLIP' (or "
                "'Load FP8 CLIP' for files saved by 'Save FP8 CLIP').")
    if not vision and image and not text:
        return (f"{name} is a {kind}CLIP vision model, not a CLIP text encoder. Load it with 'Load CLIP Vision' (or "
                "'Load FP8 CLIP Vision' for files saved by 'Save FP8 CLIP Vision').")
    if quantized:
        return (f"{name} holds quantized weights but was not saved by {saver} (no fp8clip header), so its "
                "scales cannot be checked here. Load it with ComfyUI's own loader if it supports that format.")
    if text:
        return (f"{name} is an ordinary CLIP text encoder, not an FP8 CLIP saved by this pack. Load it with "
                "'Load CLIP' (or your checkpoint loader) and connect it to 'Quantize CLIP to FP8'.")
    if image:
        return (f"{name} is an ordinary CLIP vision model, not an FP8 one saved by this pack. Load it with "
                "'Load CLIP Vision' and connect it to 'Quantize CLIP Vision to FP8'.")
    sample = ", ".join(sorted(keys)[:3])
    return f"{name} is not {what} (its tensors are named like {sample}). Pick a file written by {saver}."


def check_header(name: str, entries: Mapping[str, Any], meta: Mapping[str, str],
                 towers: tuple[str, ...] = TEXT_TOWERS) -> None:
    """Refuse files whose header does not describe an FP8 CLIP tower of `towers` this version can load."""
    if FORMAT_KEY not in meta:
        raise FP8ClipError(describe_foreign(name, entries.keys(), (e.get("dtype", "") for e in entries.values()),
                                            towers))
    try:
        version = int(meta[FORMAT_KEY])
    except ValueError:
        raise FP8ClipError(f"{name}: unreadable {FORMAT_KEY} {meta[FORMAT_KEY]!r} in its header.") from None
    if version < 1:
        raise FP8ClipError(f"{name}: invalid {FORMAT_KEY} {version} in its header; the file is damaged.")
    if version > FORMAT_VERSION:
        raise FP8ClipError(f"{name} was written by a newer comfyui-fp8-clip (file format {version}; this version "
                           f"reads {FORMAT_VERSION}). Update the pack.")
    tower = meta.get(H_TOWER)
    if tower not in towers:
        raise FP8ClipError(wrong_tower(name, tower))
    for k in (H_LAYOUT, H_RECIPE):
        if k not in meta:
            raise FP8ClipError(f"{name}: its header lacks {k}; the file is damaged. Save it again.")


def wrong_tower(name: str, tower: str | None) -> str:
    """A file of this pack given to the loader of the other kind (text <-> vision), or of an unknown tower."""
    if tower in VISION_TOWERS:
        return f"{name} is an FP8 CLIP vision model; load it with 'Load FP8 CLIP Vision' (models/clip_vision)."
    if tower in TEXT_TOWERS:
        return (f"{name} is an FP8 CLIP text encoder ({tower}), not a CLIP vision model; load it with 'Load FP8 "
                "CLIP' (models/text_encoders).")
    return (f"{name} holds a {tower!r} model, which this version of comfyui-fp8-clip does not know (it loads "
            f"{', '.join(KNOWN_TOWERS)}). Update the pack.")


def unpack_tensors(name: str, tensors: dict[str, torch.Tensor], meta: Mapping[str, str]) -> TowerFile:
    """File tensors -> the exact FP8 tower state dict, after checking every FP8 tensor has its scales."""
    layout = json.loads(meta[H_LAYOUT])
    recipe = json.loads(meta[H_RECIPE])
    activations = recipe.get("scope", "weights+activations") == "weights+activations"
    comfy_layers = set(json.loads(meta.get(COMFY_QUANT_HEADER, "{}")).get("layers", {}))
    out: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[float, float | None, float | None]] = {}
    rowwise: list[str] = []
    stores_inv = int(meta.get(FORMAT_KEY, "1")) >= 2
    fp8_in_file = {k for k, t in tensors.items() if t.dtype == FP8}
    undeclared = sorted(fp8_in_file - set(layout))
    if undeclared:
        raise FP8ClipError(f"{name}: FP8 tensor {undeclared[0]} is not described in the header "
                           f"({len(undeclared)} such); the file is damaged or was edited. Save it again.")
    for key, spec in layout.items():
        t = tensors.get(key)
        if t is None:
            raise FP8ClipError(f"{name}: the header lists {key} but the file does not hold it; the file is "
                               "incomplete. Save it again.")
        shape = [int(s) for s in spec["shape"]]
        if len(shape) != 2 or min(shape) < 1:  # FP8 weights are matrices (Linear) or tables (embedding)
            raise FP8ClipError(f"{name}: the header gives {key} the shape {shape}, which no weight has; the header "
                               "is damaged or was edited. Save the model again.")
        if t.dtype != FP8 or t.numel() != math.prod(shape):
            raise FP8ClipError(f"{name}: {key} should be float8_e4m3fn with {math.prod(shape)} values, found "
                               f"{t.dtype} with {t.numel()}; the file is damaged. Save it again.")
        layer = key[: -len(".weight")]
        scale = tensors.get(layer + ".weight_scale")
        rows = shape[0]
        if scale is None:
            raise FP8ClipError(f"{name}: layer {layer} is stored in FP8 but its weight_scale is missing, so its "
                               "weights cannot be read correctly. The file is incomplete: save it again.")
        expected = 1 if spec.get("scale") == "per-tensor" else rows
        if scale.numel() != expected or not torch.isfinite(scale.float()).all() or bool((scale.float() <= 0).any()):
            raise FP8ClipError(f"{name}: layer {layer} has an invalid weight_scale (need {expected} finite positive "
                               "value(s)); the file is damaged. Save it again.")
        out[key] = t.reshape(shape)
        if spec.get("scale") == "per-tensor":
            inp = tensors.get(layer + ".input_scale")
            if activations and inp is None:
                raise FP8ClipError(f"{name}: layer {layer} was calibrated for FP8 activations but its input_scale "
                                   "is missing. The file is incomplete: save it again.")
            if inp is not None and (inp.numel() != 1 or not math.isfinite(float(inp)) or float(inp) <= 0):
                raise FP8ClipError(f"{name}: layer {layer} has an invalid input_scale; the file is damaged.")
            inv = tensors.get(layer + ".input_scale_inv")
            if inp is not None and stores_inv and (inv is None or inv.numel() != 1  # NaN fails the <=
                                                   or not abs(float(inv) * float(inp) - 1) <= 1e-5):
                raise FP8ClipError(f"{name}: layer {layer} has a missing or invalid input_scale_inv (it must be "
                                   "1 / input_scale); the file is damaged or was edited. Save it again.")
            if layer + ".comfy_quant" not in tensors or layer not in comfy_layers:
                raise FP8ClipError(f"{name}: layer {layer} lacks its comfy_quant entry; the file is damaged.")
            quantized[layer] = (float(scale.reshape(())), None if inp is None else float(inp.reshape(())),
                                None if inp is None or inv is None else float(inv.reshape(())))
        else:
            rowwise.append(key)
    for key, t in tensors.items():
        if key in out or key.endswith(".comfy_quant"):
            continue
        out[key] = t
    return TowerFile(tower=meta[H_TOWER], family=meta.get(H_FAMILY, ""), tensors=out, quantized=quantized,
                     rowwise=rowwise, header=dict(meta))


JSON_FIELDS = {H_BUNDLE: dict, H_KEPT: list, H_REPORT: dict}  # optional header fields holding JSON (or null)
BUNDLE_FIELDS = {"class": str, "set": str, "clip_type": str, "towers": list, "others": list}  # lists: tower names


def check_header_values(tf: TowerFile) -> None:
    """The types of the header values read later (the loader, the bundle check, the Load node), checked with the
    file: an edited header failed there with a bare Python error (an unhashable set id, a string of tower names
    iterated letter by letter). Raises TypeError or ValueError, which read_tower_file reports as a damaged
    header."""
    from .recipe import Recipe

    for key, kind in JSON_FIELDS.items():
        if not isinstance(tf.meta(key), (kind, type(None))):
            raise TypeError(f"{key} is not a JSON {kind.__name__}")
    for key, kind in BUNDLE_FIELDS.items():
        v = tf.bundle.get(key)
        if v is not None and not (isinstance(v, kind) and (kind is str or all(isinstance(x, str) for x in v))):
            raise TypeError(f"{H_BUNDLE}'s {key!r} is not a {'string' if kind is str else 'list of names'}")
    try:
        Recipe.from_json(tf.header[H_RECIPE])
    except FP8ClipError as e:  # an unknown method or scope: this file's header is then damaged
        raise ValueError(f"its recipe: {e}") from None


def read_tower_file(path: str | os.PathLike, towers: tuple[str, ...] = TEXT_TOWERS) -> TowerFile:
    """Read and check a file written by `pack_tensors` holding one of `towers` (safetensors only; nothing is
    unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    entries, meta = read_header(path)
    check_header(path.name, entries, meta, towers)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged data
        raise FP8ClipError(f"{path.name} could not be read as safetensors ({e}). It is truncated or corrupt: "
                           "download or save it again.") from None
    try:
        tf = unpack_tensors(path.name, tensors, meta)
        check_header_values(tf)
    except FP8ClipError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # header JSON malformed or of the wrong shape
        raise FP8ClipError(f"{path.name}: its header is damaged or was edited ({type(e).__name__}: {e}). Save the "
                           "model again.") from None
    # After the checks above, whose messages say more; this catches what they cannot see (values changed).
    if H_DIGEST in meta and tensor_digest(tensors) != meta[H_DIGEST]:
        raise FP8ClipError(f"{path.name}: its data does not match the checksum saved with it: the file is damaged "
                           "(an interrupted download or copy?). Download or save it again.")
    return tf
