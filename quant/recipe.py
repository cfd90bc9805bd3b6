"""What to quantize and how: FP8 E4M3, per-tensor static scales, layers kept in high precision by pattern.

Patterns are shell wildcards over layer names as the report prints them, e.g. `clip_l.text_model.encoder.
layers.11.mlp.fc2`, so `*mlp.fc2`, `*layers.11.*` or `clip_l.*` all work. The recipe turns into a ModelOpt
config with one disable entry per kept layer; patterns that match nothing are reported, not ignored silently.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Iterable

from .errors import FP8ClipError

# The pooled projection runs on one token per prompt: FP8 there saves nothing and SDXL-style models use the
# pooled output directly.
DEFAULT_KEEP: tuple[str, ...] = ("*text_projection",)

METHODS = ("max", "mse")
SCOPES = ("weights+activations", "weights only")

FP8_E4M3 = {"num_bits": (4, 3), "axis": None}  # ModelOpt's spelling of per-tensor FP8 E4M3


def parse_patterns(text: str | Iterable[str]) -> tuple[str, ...]:
    """Patterns from a widget: separated by commas or new lines; '#' starts a comment line."""
    if isinstance(text, str):
        lines = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
        items = [p.strip() for ln in lines for p in ln.split(",")]
    else:
        items = [str(p).strip() for p in text]
    return tuple(dict.fromkeys(p for p in items if p))


@dataclass(frozen=True)
class Recipe:
    keep: tuple[str, ...] = DEFAULT_KEEP
    method: str = "max"
    scope: str = "weights+activations"
    fp8_embedding: bool = True  # token embedding table in FP8 with one scale per row

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FP8ClipError(f"Unknown calibration method {self.method!r}. Use one of: {', '.join(METHODS)}.")
        if self.scope not in SCOPES:
            raise FP8ClipError(f"Unknown quantization scope {self.scope!r}. Use one of: {', '.join(SCOPES)}.")
        for p in self.keep:
            try:
                re.compile(fnmatch.translate(p))
            except re.error as e:
                raise FP8ClipError(f"Keep pattern {p!r} is not a valid wildcard pattern ({e}).") from e

    @property
    def quantize_activations(self) -> bool:
        return self.scope == "weights+activations"

    def split(self, layer_names: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
        """(quantized, kept, patterns that matched no layer)."""
        names = list(layer_names)
        kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.keep)]
        unmatched = [p for p in self.keep if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        quantized = [n for n in names if n not in set(kept)]
        return quantized, kept, unmatched

    def require_layers(self, to_quantize: list[str], layers: int, unusable: list[str] = (), vision: bool = False
                       ) -> None:
        """A clear error where nothing is left to quantize (ModelOpt's own speaks of MoE layouts and pipeline
        parallelism)."""
        if to_quantize:
            return
        why = f"the keep_high_precision patterns ({', '.join(self.keep)}) match all {layers} of its Linear layers"
        if unusable:
            why += f", or their weights are not finite ({len(unusable)} layers)"
        if vision:
            raise FP8ClipError(f"Nothing to quantize in this model: {why}. Remove the pattern that matches every "
                               "layer (such as '*' or 'vision_model.*'); the default keeps only the patch "
                               "embedding: '*patch_embedding*'.")
        raise FP8ClipError(f"Nothing to quantize in this model: {why}. Remove the pattern that matches every "
                           "layer (such as 'clip_l.*' on an SD1.5 CLIP, or '*'); to leave one tower of SDXL in "
                           "high precision, 'clip_g.*' keeps CLIP-G and quantizes CLIP-L.")

    def modelopt_config(self, kept_layers: Iterable[str]) -> dict:
        """A ModelOpt quantize config: FP8 Linear weights (and inputs), nothing else, kept layers disabled."""
        cfg: list[dict] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": dict(FP8_E4M3), "enable": True},
        ]
        if self.quantize_activations:
            cfg.append({"quantizer_name": "*input_quantizer", "cfg": dict(FP8_E4M3), "enable": True})
        # Only Linear layers: LayerNorm/Embedding inputs cost accuracy (measured) and gain no FP8 matmul.
        for parent in ("nn.LayerNorm", "nn.Embedding", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d"):
            cfg.append({"quantizer_name": "*", "parent_class": parent, "enable": False})
        for name in kept_layers:
            cfg.append({"quantizer_name": f"{name}.*", "enable": False})
        return {"quant_cfg": cfg, "algorithm": self.method}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """The recipe a saved file's header holds. Unknown keys (a newer pack's) are ignored; values of the wrong
        type raise TypeError (an edited header), which the file reader turns into its "header damaged" error."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError("the recipe is not a JSON object")
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        if not isinstance(d.get("keep", []), list) or not all(isinstance(p, str) for p in d.get("keep", [])):
            raise TypeError("the recipe's keep is not a list of patterns")
        if not all(isinstance(d.get(k, ""), str) for k in ("method", "scope")):
            raise TypeError("the recipe's method or scope is not a string")
        if not isinstance(d.get("fp8_embedding", True), bool):
            raise TypeError("the recipe's fp8_embedding is not true or false")
        if "keep" in d:
            d["keep"] = tuple(d["keep"])
        return cls(**d)


def fingerprint(prompts: Iterable[str], recipe: Recipe) -> str:
    """Identifies a calibration: same prompts and recipe give the same scales (for file metadata, cache keys)."""
    h = hashlib.sha256(recipe.to_json().encode())
    for p in prompts:
        h.update(b"\x00" + p.encode())
    return h.hexdigest()[:16]
