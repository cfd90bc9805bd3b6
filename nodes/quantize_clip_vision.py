from __future__ import annotations

from ..quant.recipe import Recipe, parse_patterns
from .lists import unlist
from .quantize_clip import RUNTIME_CHOICES, method_widget, scope_widget
from .tensorrt_engine import run_on_engine
from .ui import interrupt_check, progress_bar


class QuantizeCLIPVision:
    NODE_ID = "FP8CLIPVisionQuantize"
    DISPLAY_NAME = "Quantize CLIP Vision to FP8 (calibrated)"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Calibrates a CLIP vision model (IP-Adapter, unCLIP; not SigLIP) on images with NVIDIA Model "
                   "Optimizer and returns an FP8 E4M3 copy for CLIPVisionEncode and friends, with a report of "
                   "the quality cost. The patch embedding stays in high precision. The input is not changed.")
    RETURN_TYPES = ("CLIP_VISION", "STRING")
    RETURN_NAMES = ("clip_vision", "report")
    OUTPUT_TOOLTIPS = ("The FP8 CLIP vision model on the chosen runtime (the report's last lines say which, and why).",
                       "Quality report: cosine of image embeddings vs the original on held-out images, label "
                       "agreement, kept layers, timing.")
    FUNCTION = "quantize_lists"
    INPUT_IS_LIST = True  # an image list calibrates once on all its images (see lists.py)

    @classmethod
    def INPUT_TYPES(cls):
        from ..quant.vision import DEFAULT_VISION_KEEP

        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "From Load CLIP Vision."}),
            "keep_high_precision": ("STRING", {
                "default": ", ".join(DEFAULT_VISION_KEEP),
                "tooltip": "Layers to leave unquantized (wildcards, comma separated), matched against the layer "
                           "names in the report. The patch embedding is never quantized."}),
            "method": method_widget(),
            "quantize": scope_widget(),
            "min_cosine": ("FLOAT", {"default": 0.99, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Warn when the worst held-out image falls below this."}),
            "runtime": (list(RUNTIME_CHOICES), {
                "default": "auto",
                "tooltip": "fp8: FP8 weights in memory, FP8 matmuls with fused kernels on GPUs that have them "
                           "(RTX 40xx, H100...), dequantized on the fly elsewhere, with CUDA graphs. fp8-compiled: "
                           "torch.compile instead of the fused kernels. fake-quant: simulation only (float32 "
                           "copies: more memory, not faster), to judge quality. tensorrt: fp8, then a TensorRT engine for up to 4 "
                           "images per encode (built once, cached in models/tensorrt; falls back to fp8 where it "
                           "cannot run, and says so). auto: fp8."}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Calibration images like the ones you will encode (any size; a "
                                             "batch or an image list). Empty: a built-in synthetic set of 32. "
                                             "Not used with 'weights only', whose scales come from the weights."}),
            "evaluation_images": ("IMAGE", {"tooltip": "Images to measure the quality on (not used for "
                                                        "calibration; a batch or an image list). Empty: 20 "
                                                        "built-in synthetic images."}),
        }}

    def quantize_lists(self, **inputs):
        from ..quant.images import one_batch

        args = unlist(inputs, {"images": list, "evaluation_images": list})  # joined below, at the model's size
        size = getattr(args["clip_vision"], "image_size", 224)
        if args.get("quantize") == "weights only":
            args.pop("images", None)  # not used: the scales come from the weights
        for name, what in (("images", "calibration images"), ("evaluation_images", "evaluation images")):
            if name in args:
                args[name] = one_batch(args[name], size, what)
        return self.quantize(**args)

    def quantize(self, clip_vision, keep_high_precision, method, quantize, min_cosine, runtime="auto", images=None,
                 evaluation_images=None):
        from ..quant.images import held_out_images
        from ..quant.runtime import describe, to_fp8_runtime, verify_vision
        from ..quant.vision import quantize_clip_vision

        recipe = Recipe(keep=parse_patterns(keep_high_precision), method=method, scope=quantize, fp8_embedding=False)
        stop_if_cancelled = interrupt_check()
        qcv, report = quantize_clip_vision(clip_vision, images, recipe, min_cosine=min_cosine,
                                           held_out=evaluation_images, progress=progress_bar(),
                                           check_interrupt=stop_if_cancelled)
        stop_if_cancelled()
        out, plan = to_fp8_runtime(qcv, "fp8" if runtime == "tensorrt" else runtime)
        stop_if_cancelled()
        check = (held_out_images()[0] if evaluation_images is None else evaluation_images)[:8]
        fidelity = verify_vision(qcv, out, check, drop_reference=True) if out is not qcv else None
        text = report.text() + "\n" + describe(out, plan, fidelity, len(check), "image_embeds", "images")
        if runtime == "tensorrt":
            out, status = run_on_engine(out, True, 4)
            text += "\n" + status
        return {"ui": {"text": [text]}, "result": (out, text)}
