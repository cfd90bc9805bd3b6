from __future__ import annotations

import logging

from ..trt_runtime.watch import EngineUse, EngineWatch
from .ui import interrupt_check, progress_bar

log = logging.getLogger("comfyui-fp8-clip")


def _register_tensorrt_folder() -> None:
    # At import, so ComfyUI lists models/tensorrt with .engine files like its own folders. Cheap: no TensorRT import.
    try:
        import folder_paths

        from ..trt_runtime.cache import register_folder
        register_folder(folder_paths)
    except Exception as e:  # noqa: BLE001  (outside ComfyUI, or an odd folder_paths: the node registers lazily)
        log.debug("tensorrt model folder not registered at import: %s", e)


_register_tensorrt_folder()


_WATCH = EngineWatch()  # the engine files each node's output runs on (IS_CHANGED)


def run_on_engine(model, vision: bool, max_rows: int, activations: str = "float32", node_id: str | None = None):
    """(model on a cached engine, status), or (model unchanged, why not): what the engine nodes and the
    quantize nodes' `tensorrt` runtime do. `node_id`: the engine node's, watched for its engine files changing
    (see IS_CHANGED)."""
    import comfy.model_management
    import folder_paths
    import torch

    from ..trt_runtime.availability import engine_support
    from ..trt_runtime.cache import register_folder
    from ..trt_runtime.pipeline import engine_clip, engine_clip_vision

    root = register_folder(folder_paths)[0]
    bar = progress_bar()
    # Where ComfyUI runs this encoder (its own load device: cuda:1 for a CLIP a multi-GPU loader put there), which
    # is where the engine must run; a CLIP kept on the CPU (--lowvram...) gets ComfyUI's GPU, loaded per encode.
    device = getattr(model, "load_device", None) if vision else getattr(model.patcher, "load_device", None)
    if device is None or torch.device(device).type != "cuda":
        device = comfy.model_management.get_torch_device()
    run = engine_clip_vision if vision else engine_clip
    used = EngineUse() if node_id is not None else None
    out, status = run(model, max_rows, engine_support(device), cache_root=root, activations=activations,
                      progress=lambda f, phase: bar(int(f * 100), 100), check_interrupt=interrupt_check(), used=used)
    log.info(status)
    if used is not None:
        _WATCH.ran(node_id, used)
    return out, status


class _WatchedEngineNode:
    @classmethod
    def IS_CHANGED(cls, unique_id=None, **_):
        # Again when an engine file it used was deleted, damaged or rebuilt elsewhere: ComfyUI would reuse its output.
        return _WATCH.token(unique_id)


class BuildTensorRTEngine(_WatchedEngineNode):
    NODE_ID = "FP8CLIPTensorRTEngine"
    DISPLAY_NAME = "Build TensorRT Engine for FP8 CLIP"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Builds (once, then cached in models/tensorrt) a TensorRT engine from the FP8 CLIP of 'Quantize "
                   "CLIP to FP8' and returns a CLIP whose text encoder runs on it. Where the engine cannot run "
                   "(no NVIDIA GPU, a GPU without FP8 support in the installed TensorRT, no TensorRT), the CLIP "
                   "comes back unchanged and the status says why.")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "status")
    OUTPUT_TOOLTIPS = ("The CLIP on the TensorRT engine (or unchanged, see status).",
                       "What happened: engine built or found in the cache, or why it is not used.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The clip output of 'Quantize CLIP to FP8 (calibrated)'."}),
            "max_batch_rows": ("INT", {
                "default": 8, "min": 1, "max": 64,
                "tooltip": "Largest batch the engine accepts, in rows of 77 tokens: a prompt takes one row per "
                           "77 tokens and one more when it has (word:1.2) weights. Changing it rebuilds."}),
            "activations": (["float32", "float16"], {
                "default": "float32",
                "tooltip": "Precision between the FP8 matmuls. float32 reproduces the quality report's numbers; "
                           "float16 moves less memory but rounds once more. Changing it rebuilds."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def build(self, clip, max_batch_rows, activations="float32", unique_id=None):
        out, status = run_on_engine(clip, False, max_batch_rows, activations, unique_id)
        return {"ui": {"text": [status]}, "result": (out, status)}


class BuildTensorRTEngineVision(_WatchedEngineNode):
    NODE_ID = "FP8CLIPVisionTensorRTEngine"
    DISPLAY_NAME = "Build TensorRT Engine for FP8 CLIP Vision"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Builds (once, then cached in models/tensorrt) a TensorRT engine from the FP8 CLIP_VISION of "
                   "'Quantize CLIP Vision to FP8' (pixel values in: patch embedding to the last block on the "
                   "engine) and returns a CLIP_VISION for CLIPVisionEncode that runs on it. Where the engine cannot "
                   "run (no NVIDIA GPU, a GPU without FP8 support in the installed TensorRT, no TensorRT), the "
                   "CLIP_VISION comes back unchanged and the status says why.")
    RETURN_TYPES = ("CLIP_VISION", "STRING")
    RETURN_NAMES = ("clip_vision", "status")
    OUTPUT_TOOLTIPS = ("The CLIP vision model on the TensorRT engine (or unchanged, see status).",
                       "What happened: engine built or found in the cache, or why it is not used.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "The clip_vision output of 'Quantize CLIP Vision to FP8 "
                                                       "(calibrated)'."}),
            "max_images": ("INT", {
                "default": 4, "min": 1, "max": 64,
                "tooltip": "Largest batch of images the engine accepts in one encode. Changing it rebuilds."}),
            "activations": (["float32", "float16"], {
                "default": "float32",
                "tooltip": "Precision between the FP8 matmuls. float32 reproduces the quality report's numbers; "
                           "float16 moves less memory but rounds once more. Changing it rebuilds."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def build(self, clip_vision, max_images, activations="float32", unique_id=None):
        out, status = run_on_engine(clip_vision, True, max_images, activations, unique_id)
        return {"ui": {"text": [status]}, "result": (out, status)}
