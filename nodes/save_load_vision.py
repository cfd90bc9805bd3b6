"""Save FP8 CLIP Vision / Load FP8 CLIP Vision: widgets -> quant.serialize_vision (models/clip_vision)."""
from __future__ import annotations

from .save_load import files_changed_token, full_path, runtime_widget, safetensors_files

FOLDER = "clip_vision"


class SaveFP8CLIPVision:
    NODE_ID = "FP8CLIPVisionSave"
    DISPLAY_NAME = "Save FP8 CLIP Vision"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Saves the FP8 CLIP vision model from 'Quantize CLIP Vision to FP8' into models/clip_vision: FP8 "
                   "weights with their calibrated scales in ComfyUI's quantized layout, the quality report and the "
                   "recipe in the header. Load it with 'Load FP8 CLIP Vision'; stock 'Load CLIP Vision' refuses it "
                   "with an error instead of loading it wrong.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "The output of 'Quantize CLIP Vision to FP8'."}),
            "filename": ("STRING", {"default": "fp8/clip_vision_fp8",
                                    "tooltip": "Inside models/clip_vision; sub-folders allowed, no '..'."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of the same name."}),
        }}

    def save(self, clip_vision, filename, overwrite=False):
        import folder_paths

        from ..quant.serialize_vision import save_fp8_clip_vision

        path = save_fp8_clip_vision(clip_vision, folder_paths.get_folder_paths(FOLDER)[0], filename, overwrite)
        text = f"Saved {path}\nLoad with 'Load FP8 CLIP Vision'."
        return {"ui": {"text": [text]}, "result": (text,)}


class LoadFP8CLIPVision:
    NODE_ID = "FP8CLIPVisionLoad"
    DISPLAY_NAME = "Load FP8 CLIP Vision"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Loads a CLIP vision model saved by 'Save FP8 CLIP Vision' (from models/clip_vision), with FP8 "
                   "weights in memory; its outputs equal the quantized CLIP_VISION it was saved from.")
    RETURN_TYPES = ("CLIP_VISION", "STRING")
    RETURN_NAMES = ("clip_vision", "info")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (safetensors_files(FOLDER), {"tooltip": "A file written by 'Save FP8 CLIP Vision'."}),
            "runtime": runtime_widget(),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name, **_):
        return files_changed_token([clip_name], FOLDER)

    def load(self, clip_name, runtime="auto"):
        from ..quant.serialize_vision import load_fp8_clip_vision, summary_text

        cv, tf = load_fp8_clip_vision(full_path(clip_name, FOLDER, "models/clip_vision"), runtime)
        text = summary_text(tf.report)
        return {"ui": {"text": [text]}, "result": (cv, text)}
