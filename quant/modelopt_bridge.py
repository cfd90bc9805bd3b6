"""The only module that talks to NVIDIA Model Optimizer.

ComfyUI's Linear classes (comfy.ops.*.Linear) override `forward`, and ModelOpt only converts subclasses of
nn.Linear whose forward it knows, so they are registered with ModelOpt's `_QuantLinear` first; otherwise
ModelOpt inserts no quantizer and says "no weight quantizer is enabled".
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

from .errors import FP8ClipError

log = logging.getLogger(__name__)


SUPPORTED = ((0, 47), (0, 48))  # [from, to) as requirements.txt pins it: the versions the tests run on
INSTALL = ("install it into ComfyUI's own Python: <that python> -m pip install -r custom_nodes/comfyui-fp8-clip/"
           "requirements.txt (ComfyUI-Manager does this on install; the portable Windows build's Python is "
           "python_embeded\\python.exe), then restart ComfyUI")


@functools.lru_cache(maxsize=1)
def require_modelopt() -> str:
    """The installed ModelOpt version; an error naming the fix where it is missing or not a supported version
    (older ones fail deep inside calibration: 0.40 with a pydantic ValidationError, 0.44 with 'parent_class
    nn.Embedding not found')."""
    try:
        version = metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        if importlib.util.find_spec("modelopt") is not None:
            return "unknown"  # importable without package metadata (a vendored copy): trust it
        raise FP8ClipError("NVIDIA Model Optimizer (pip package nvidia-modelopt), which the quantize nodes "
                           f"calibrate with, is not installed: {INSTALL}.") from None
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if not SUPPORTED[0] <= parts < SUPPORTED[1]:
        want = ".".join(map(str, SUPPORTED[0]))
        raise FP8ClipError(f"nvidia-modelopt {version} is installed; this pack works with {want}.x "
                           f"(nvidia-modelopt>={want},<{'.'.join(map(str, SUPPORTED[1]))}): {INSTALL}.")
    return version


def load_modelopt() -> None:
    """ModelOpt imported now, before the minutes of encodes that come first: an install that cannot be imported
    (a dependency missing, a torch it does not work with) fails here with the fix, not after them as a bare
    ImportError."""
    try:
        _mtq()
    except FP8ClipError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever its import raises
        raise FP8ClipError(f"NVIDIA Model Optimizer (nvidia-modelopt {require_modelopt()}) is installed but cannot "
                           f"be imported ({type(e).__name__}: {e}). Reinstall it and its dependencies: "
                           f"{INSTALL}.") from None


def _mtq():
    require_modelopt()
    # Imported on first use: ModelOpt takes seconds to import and ComfyUI's start-up should not pay for it.
    if "modelopt.torch.quantization" not in sys.modules:
        _import_in_a_thread("modelopt.torch.quantization")
    import modelopt.torch.quantization as mtq

    _eager_fp8_formula()
    return mtq


def _import_in_a_thread(name: str) -> None:
    """Import `name` from a thread of its own. ModelOpt's import keeps exceptions of optional imports that failed
    (pulp's solvers), tracebacks included, for the life of the process; their frames hold every caller's frame,
    which in the quantize node is the first calibration's copy of the model (GBs for SDXL)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            failed.append(e)

    t = threading.Thread(target=run, name="fp8clip-import")
    t.start()
    t.join()
    if failed:
        raise failed[0]


def _eager_fp8_formula() -> None:
    """ModelOpt's own eager FP8 fake-quant formula, not its CUDA extension: on a GPU machine with a CUDA
    toolkit, ModelOpt builds that extension with nvcc on first use (90 s inside a queued workflow, seen on an
    H100) and sets TORCH_CUDA_ARCH_LIST for the whole process; without a toolkit it falls back to the same
    formula. The FP8 runtime reproduces this formula (fp8_ops), so the report measures what runs. Marking
    the extension as absent is ModelOpt's cached "could not load" state; one that is loaded already stays."""
    from modelopt.torch.quantization import extensions

    if not hasattr(extensions.get_cuda_ext_fp8, "extension"):
        extensions.get_cuda_ext_fp8.extension = None


def register_linear_classes(module: torch.nn.Module) -> None:
    mtq = _mtq()
    from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear

    for cls in {type(m) for m in module.modules() if isinstance(m, torch.nn.Linear)}:
        if cls is torch.nn.Linear or mtq.QuantModuleRegistry.get(cls) is not None:
            continue
        if getattr(cls, "__module__", "").startswith("modelopt."):
            continue  # already a quantized class (re-quantizing a quantized module)
        mtq.QuantModuleRegistry.register({cls: f"{cls.__module__}.{cls.__qualname__}"})(_QuantLinear)


def linear_layer_names(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def nonfinite_weight_layers(module: torch.nn.Module, names: list[str]) -> list[str]:
    """Layers among `names` whose weight holds NaN or inf (ModelOpt's calibration asserts on them). A checkpoint
    without a tower's projection (SDXL's CLIP-L) leaves ComfyUI's uninitialized: NaN on a GPU, seen on an H100."""
    def finite(w: torch.Tensor) -> bool:  # float8 (--fp8_e4m3fn-text-enc) has no isfinite: widen it
        return bool(torch.isfinite(w.float() if w.element_size() == 1 else w).all())

    return [n for n in names if not finite(module.get_submodule(n).weight)]


def quantize(module: torch.nn.Module, config: dict, forward_loop: Callable[[torch.nn.Module], None] | None) -> None:
    """Insert quantizers per `config` and calibrate them in place by running `forward_loop` (None: the weight
    quantizers only, from the weights, as ModelOpt's max calibration does for a weights-only config)."""
    mtq = _mtq()
    register_linear_classes(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mtq.quantize(module, config, forward_loop)
        except AssertionError as e:
            if "nan" not in str(e).lower() and "inf" not in str(e).lower():
                raise
            # ModelOpt's calibrator asserts on a non-finite amax, naming neither a layer nor a cause
            raise FP8ClipError(
                "The model's activations hold NaN or infinite values on the calibration prompts, so no FP8 scale "
                "can be calibrated (the original CLIP gives NaN for them too). Usual causes: an `embedding:` "
                "(textual inversion) file or a LoRA / merge with NaN or inf in it. Remove it from the prompts or "
                f"the model, or check the original's output for these prompts. (ModelOpt: {e})") from None


def calibration_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every enabled quantizer's calibrated amax (CPU copies): all a calibration found, for quantize_calibrated."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.amax.detach().to("cpu", copy=True) for n, m in module.named_modules()
            if isinstance(m, TensorQuantizer) and m.is_enabled and m.amax is not None}


def quantize_calibrated(module: torch.nn.Module, config: dict, amax: dict[str, torch.Tensor]) -> None:
    """Insert quantizers per `config` and give them the amax of an earlier calibration (calibration_state of the
    same tower, same config), running no data: the same quantized model as that calibration, bit for bit."""
    _mtq()
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantize(module, {**config, "algorithm": None}, None)
    enabled = {n: m for n, m in module.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    if set(enabled) != set(amax):
        raise FP8ClipError(f"The remembered calibration has {len(amax)} quantizers, this model {len(enabled)}: it "
                           "does not fit. Change one of the node's inputs (or restart ComfyUI) to calibrate again, "
                           "and report it: this should not happen.")
    for n, q in enabled.items():  # where the layer's weight is: the amax moves with it from now on
        q.amax = amax[n].to(module.get_submodule(n.rsplit(".", 1)[0]).weight.device)


def fold_weights(module: torch.nn.Module) -> None:
    """Store the Q->DQ weights in place of the originals: same output, no per-call weight fake-quant."""
    _mtq().fold_weight(module, keep_attrs=True)


@dataclass(frozen=True)
class LayerScales:
    """Per-tensor scales of one quantized Linear, in ComfyUI's convention (scale = amax / 448)."""
    weight_scale: float
    input_scale: float | None  # None: weights only
    # What ModelOpt multiplies inputs by before rounding to FP8: 448 / amax in fp32. For about one layer in six
    # it is not 1 / input_scale in fp32, and an ulp there flips FP8 roundings that cascade through the model.
    input_scale_inv: float | None = None


FP8_MAX = 448.0


def _scales(q) -> tuple[float, float] | None:
    """(dequantization scale, quantization multiplier) exactly as ModelOpt's FP8 quantizer computes them:
    1 / (448 / amax) and 448 / amax, in fp32."""
    if q is None or not getattr(q, "is_enabled", False):
        return None
    a = getattr(q, "amax", None)
    if a is None:
        return None
    amax = a.detach().to(torch.float32).max().reshape(())
    # An all-zero tensor (amax 0): ModelOpt's formula takes amax 1, which keeps it zero; 448 / 0 would make
    # every FP8 code NaN, and the saved file unloadable.
    amax = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
    mult = FP8_MAX / amax  # the same tensor ops as ModelOpt's _fp8_eager, so the same rounding
    return float(1 / mult), float(mult)


def quantized_layers(module: torch.nn.Module) -> dict[str, LayerScales]:
    """Every Linear whose weight quantizer is enabled, with its calibrated scales."""
    out: dict[str, LayerScales] = {}
    for name, m in module.named_modules():
        w = _scales(getattr(m, "weight_quantizer", None))
        if w is None:
            continue
        i = _scales(getattr(m, "input_quantizer", None))
        out[name] = LayerScales(w[0], None if i is None else i[0], None if i is None else i[1])
    return out
