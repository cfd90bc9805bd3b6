from __future__ import annotations

from ..quant.prompts import DEFAULT_CALIBRATION_TEXT, parse_prompts
from ..quant.recipe import DEFAULT_KEEP, METHODS, SCOPES, Recipe, parse_patterns
from .ui import interrupt_check, progress_bar


class QuantizeCLIP:
    NODE_ID = "FP8CLIPQuantize"
    DISPLAY_NAME = "Quantize CLIP to FP8 (calibrated)"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Calibrates the CLIP text encoder on prompts with NVIDIA Model Optimizer and returns an FP8 "
                   "E4M3 (per-tensor, static scales) copy that drops into CLIPTextEncode, plus a report of the "
                   "quality cost against the original. The input CLIP is not changed.")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "report")
    OUTPUT_TOOLTIPS = ("The FP8 CLIP (fake-quantized: FP8 numerics, original speed).",
                       "Quality report: cosine vs the original on held-out prompts, kept layers, timing.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "A CLIP from Load Checkpoint, Load CLIP or a LoRA loader."}),
            "calibration_prompts": ("STRING", {
                "multiline": True, "default": DEFAULT_CALIBRATION_TEXT,
                "tooltip": "One prompt per line. Use prompts like the ones you generate with; "
                           "the default is a built-in set of 64 varied prompts."}),
            "keep_high_precision": ("STRING", {
                "multiline": False, "default": ", ".join(DEFAULT_KEEP),
                "tooltip": "Layers to leave unquantized: wildcard patterns separated by commas, matched "
                           "against layer names as the report prints them (e.g. *mlp.fc2, *layers.11.*)."}),
            "method": (list(METHODS), {"default": "max",
                                       "tooltip": "max: NVIDIA's recipe (amax of the calibration data). "
                                                  "mse: searches weight scales that minimise the error."}),
            "quantize": (list(SCOPES), {"default": SCOPES[0],
                                        "tooltip": "weights+activations gives FP8 matmuls; weights only "
                                                   "keeps activations in high precision (FP8 storage only)."}),
            "min_cosine": ("FLOAT", {"default": 0.99, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Warn when the worst held-out prompt falls below this."}),
        }}

    def quantize(self, clip, calibration_prompts, keep_high_precision, method, quantize, min_cosine):
        from ..quant.calibrate import quantize_clip

        recipe = Recipe(keep=parse_patterns(keep_high_precision), method=method, scope=quantize)
        qclip, report = quantize_clip(clip, parse_prompts(calibration_prompts), recipe, min_cosine=min_cosine,
                                      progress=progress_bar(), check_interrupt=interrupt_check())
        text = report.text()
        for w in report.warnings():
            import logging
            logging.getLogger("comfyui-fp8-clip").warning(w)
        return {"ui": {"text": [text]}, "result": (qclip, text)}
