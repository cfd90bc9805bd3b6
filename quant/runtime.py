"""Which runtime a quantized CLIP runs on, and swapping it in per clone.

- fake-quant: ModelOpt's Q->DQ simulation (the quality preview; original memory and speed).
- fp8: FP8TextModel, FP8 weights in memory; FP8 matmuls with CUDA graphs on compute capability 8.9+,
  on-the-fly dequantization elsewhere (older GPUs, CPU).
- tensorrt: an engine built from the FP8 Q/DQ ONNX export (trt_runtime/).
`auto` takes the fastest that works on the CLIP's load device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import artifact
from .errors import FP8ClipError
from .fp8_ops import fp8_matmul_support
from .fp8_text_model import FP8TextModel
from .patching import weight_bytes

RUNTIMES = ("auto", "fp8", "fp8-compiled", "fake-quant", "tensorrt")
GPU_ACT_DTYPE = "float32"  # measured in bench/: fp16 activations drift further from the calibrated numbers


@dataclass(frozen=True)
class Plan:
    runtime: str  # "fp8" | "fake-quant" | "tensorrt"
    matmul: str = "dequant"  # fp8: "scaled_mm" | "dequant"
    executor: str = "eager"  # fp8: "eager" | "cuda_graph" | "compiled"
    act_dtype: str = "float32"  # activations between the FP8 matmuls
    reason: str = ""


def plan(requested: str, device: torch.device, compile_ok: bool | None = None) -> Plan:
    if requested not in RUNTIMES:
        raise FP8ClipError(f"Unknown runtime {requested!r}. Use one of: {', '.join(RUNTIMES)}.")
    if requested == "fake-quant":
        return Plan("fake-quant", reason="quality preview: FP8 numerics simulated, original weights in memory")
    if requested == "tensorrt":
        raise FP8ClipError("Use the 'Build TensorRT Engine for FP8 CLIP' node for the TensorRT runtime.")
    ok, why = fp8_matmul_support(device)
    if ok:
        if compile_ok is None:
            compile_ok = requested == "fp8-compiled"
        # CUDA graphs by default: ComfyUI's per-encode overhead dominates CLIP-L, and compiling costs
        # ~20 s on first use for little gain there (bench/results). "compiled" is opt-in.
        executor = "compiled" if compile_ok else "cuda_graph"
        return Plan("fp8", "scaled_mm", executor, GPU_ACT_DTYPE,
                    f"FP8 matmuls ({why}), {executor.replace('_', ' ')}")
    if device.type == "cuda":
        return Plan("fp8", "dequant", "cuda_graph", GPU_ACT_DTYPE, f"FP8 weights, dequantized per matmul: {why}")
    return Plan("fp8", "dequant", "eager", "float32", f"FP8 weights, dequantized per matmul: {why}")



def to_fp8_runtime(qclip: Any, requested: str = "auto", compile_ok: bool | None = None) -> tuple[Any, Plan]:
    """A clone of a fake-quant CLIP whose quantized towers hold FP8 weights and run the planned kernels."""
    towers = artifact.quantized_towers(qclip)
    if not towers:
        raise FP8ClipError("This CLIP is not quantized by this pack: connect the output of 'Quantize CLIP to FP8'.")
    device = torch.device(qclip.patcher.load_device)
    p = plan(requested, device, compile_ok)
    if p.runtime == "fake-quant":
        return qclip, p
    out = qclip.clone()
    size = qclip.patcher.model_size()
    for path, (module, record) in towers.items():
        if isinstance(module, FP8TextModel):
            fp8 = module
        else:
            fp8 = FP8TextModel.from_quantized(module, record.scales, fp8_embedding=record.recipe.fp8_embedding)
            artifact.attach(fp8, record)
        fp8.configure(lambda d, requested=requested, compile_ok=compile_ok: plan(requested, d, compile_ok))
        fp8.load_device = device
        size += weight_bytes(fp8) - record.source_bytes
        out.patcher.add_object_patch(path, fp8)
    out.patcher.size = size  # what ComfyUI's memory management budgets for this clone
    return out, p


def verify(reference_clip: Any, runtime_clip: Any, prompts: list[str]) -> float:
    """Worst conditioning cosine of `runtime_clip` against `reference_clip` (the Q->DQ model) on `prompts`."""
    from .calibrate import encode
    from .fidelity import score

    return min(score(p, encode(reference_clip, p), encode(runtime_clip, p)).cond_cosine for p in prompts)


def describe(clip: Any, p: Plan, fidelity: float | None, checked: int) -> str:
    size = clip.patcher.model_size()
    lines = [f"Runtime: {p.runtime} ({p.reason})"]
    towers = artifact.quantized_towers(clip)
    src = sum(r.source_bytes for _, r in towers.values())
    now = sum(weight_bytes(m) for m, _ in towers.values())
    if p.runtime == "fp8" and src:
        lines.append(f"  text encoder weights in memory: {now / 2**20:.0f} MiB for the quantized towers "
                     f"({now / src:.2f}x of {src / 2**20:.0f} MiB), {size / 2**20:.0f} MiB for the whole CLIP")
    if fidelity is not None:
        lines.append(f"  matches the calibrated Q->DQ model: worst conditioning cosine {fidelity:.5f} "
                     f"on {checked} held-out prompts")
    return "\n".join(lines)
