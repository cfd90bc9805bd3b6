"""ComfyUI node classes: thin adapters from widgets to quant/ and trt_runtime/."""
from .compare import CompareConditioning
from .quantize_clip import QuantizeCLIP
from .quantize_clip_vision import QuantizeCLIPVision
from .save_load import LoadFP8CLIP, SaveFP8CLIP
from .save_load_vision import LoadFP8CLIPVision, SaveFP8CLIPVision
from .tensorrt_engine import BuildTensorRTEngine, BuildTensorRTEngineVision

NODES = (QuantizeCLIP, QuantizeCLIPVision, CompareConditioning, SaveFP8CLIP, LoadFP8CLIP, SaveFP8CLIPVision,
         LoadFP8CLIPVision, BuildTensorRTEngine, BuildTensorRTEngineVision)

NODE_CLASS_MAPPINGS = {n.NODE_ID: n for n in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {n.NODE_ID: n.DISPLAY_NAME for n in NODES}
