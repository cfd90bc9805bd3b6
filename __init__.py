"""comfyui-fp8-clip: calibrated FP8 CLIP encoders for ComfyUI (NVIDIA Model Optimizer, TensorRT)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web/js"  # served at /extensions/<pack>/: its scripts import ../../scripts/app.js

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
