from __future__ import annotations

import logging

from ..quant.prompts import DEFAULT_CALIBRATION_TEXT, parse_prompts
from ..quant.recipe import DEFAULT_KEEP, METHODS, SCOPES, Recipe, parse_patterns
from .lists import prompts_of, unlist
from .tensorrt_engine import run_on_engine
from .ui import interrupt_check, progress_bar

RUNTIME_CHOICES = ("auto", "fp8", "fp8-compiled", "tensorrt", "fake-quant")
log = logging.getLogger("comfyui-fp8-clip")


def method_widget() -> tuple:
    """The calibration-method widget of both quantize nodes."""
    return (list(METHODS), {"default": "max", "tooltip": "max: NVIDIA's recipe (amax of the calibration data). "
                                                         "mse: searches weight scales that minimise the error."})


def scope_widget() -> tuple:
    """The what-to-quantize widget of both quantize nodes."""
    return (list(SCOPES), {"default": SCOPES[0], "tooltip": "weights+activations gives FP8 matmuls; weights only "
                                                            "keeps activations in high precision (FP8 storage only)."})


class QuantizeCLIP:
    NODE_ID = "FP8CLIPQuantize"
    DISPLAY_NAME = "Quantize CLIP to FP8 (calibrated)"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Calibrates the CLIP text encoder on prompts with NVIDIA Model Optimizer and returns an FP8 "
                   "E4M3 (static scales: per tensor, per row for the token table) copy that drops into CLIPTextEncode, plus a report of the "
                   "quality cost against the original. The input CLIP is not changed.")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "report")
    OUTPUT_TOOLTIPS = ("The FP8 CLIP on the chosen runtime (the report's last lines say which, and why).",
                       "Quality report: cosine vs the original on held-out prompts, kept layers, timing.")
    FUNCTION = "quantize_lists"
    INPUT_IS_LIST = True  # a prompt list calibrates once on all its prompts (see lists.py)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "A CLIP from Load Checkpoint, Load CLIP or a LoRA loader."}),
            "calibration_prompts": ("STRING", {
                "multiline": True, "default": DEFAULT_CALIBRATION_TEXT,
                "tooltip": "One prompt per line (lines starting with # are skipped), or a prompt list wired in "
                           "(each item one prompt). Use prompts like the ones you generate with; "
                           "the default is a built-in set of 64 varied prompts. Not used with 'weights only', "
                           "whose scales come from the weights."}),
            "keep_high_precision": ("STRING", {
                "multiline": False, "default": ", ".join(DEFAULT_KEEP),
                "tooltip": "Layers to leave unquantized: wildcard patterns separated by commas, matched "
                           "against layer names as the report prints them (e.g. *mlp.fc2, *layers.11.*)."}),
            "method": method_widget(),
            "quantize": scope_widget(),
            "min_cosine": ("FLOAT", {"default": 0.99, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Warn when the worst held-out prompt falls below this."}),
            "runtime": (list(RUNTIME_CHOICES), {
                "default": "auto",
                "tooltip": "fp8: FP8 weights in memory, FP8 matmuls with fused kernels on GPUs that have them "
                           "(RTX 40xx, H100...), dequantized on the fly elsewhere, with CUDA graphs. fp8-compiled: "
                           "torch.compile instead of the fused kernels (3-27 s to compile on first use). "
                           "fake-quant: simulation only "
                           "(float32 copies: more memory, not faster), to judge quality. tensorrt: fp8, then a TensorRT engine (built "
                           "once, cached in models/tensorrt; up to 8 rows of 77 tokens; falls back to fp8 where it "
                           "cannot run, and says so). auto: fp8."}),
            "fp8_token_embedding": ("BOOLEAN", {
                "default": True,
                "tooltip": "Store the token embedding table in FP8 too (one scale per row): about a third "
                           "of CLIP-L's weights. Its cost is in the report."}),
        }, "optional": {
            "evaluation_prompts": ("STRING", {
                "multiline": True, "default": "",
                "tooltip": "Prompts to measure the quality on, one per line, # lines skipped, or a prompt list "
                           "(not used for calibration). Empty: 24 built-in held-out prompts."}),
        }}

    def quantize_lists(self, **inputs):
        return self.quantize(**unlist(inputs, {"calibration_prompts": prompts_of, "evaluation_prompts": prompts_of}))

    def quantize(self, clip, calibration_prompts, keep_high_precision, method, quantize, min_cosine,
                 runtime="auto", fp8_token_embedding=True, evaluation_prompts=""):
        from ..quant.calibrate import quantize_clip
        from ..quant.prompts import evaluation_prompts as held_out_of
        from ..quant.runtime import describe, to_fp8_runtime, verify

        recipe = Recipe(keep=parse_patterns(keep_high_precision), method=method, scope=quantize,
                        fp8_embedding=fp8_token_embedding)
        held_out, note = held_out_of(evaluation_prompts)
        stop_if_cancelled = interrupt_check()
        qclip, report = quantize_clip(clip, parse_prompts(calibration_prompts), recipe, held_out=held_out,
                                      min_cosine=min_cosine, progress=progress_bar(), check_interrupt=stop_if_cancelled)
        stop_if_cancelled()  # the FP8 conversion and its check take seconds on SDXL
        out, plan = to_fp8_runtime(qclip, "fp8" if runtime == "tensorrt" else runtime)
        stop_if_cancelled()
        check = held_out[:6]
        fidelity = verify(qclip, out, check, drop_reference=True) if out is not qclip else None
        text = report.text() + "\n" + describe(out, plan, fidelity, len(check))
        if note:
            text += "\n" + note
        if runtime == "tensorrt":
            out, status = run_on_engine(out, False, 8)
            text += "\n" + status
        for w in report.warnings():
            log.warning(w)
        return {"ui": {"text": [text]}, "result": (out, text)}
