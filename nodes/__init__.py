"""ComfyUI node classes: thin adapters from widgets to quant/ and trt_runtime/."""
from .compare import CompareConditioning
from .quantize_clip import QuantizeCLIP
from .quantize_clip_vision import QuantizeCLIPVision
from .tensorrt_engine import BuildTensorRTEngine

NODES = (QuantizeCLIP, QuantizeCLIPVision, CompareConditioning, BuildTensorRTEngine)

NODE_CLASS_MAPPINGS = {n.NODE_ID: n for n in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {n.NODE_ID: n.DISPLAY_NAME for n in NODES}
