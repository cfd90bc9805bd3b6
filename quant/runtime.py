"""Which runtime a quantized CLIP runs on, and swapping it in per clone.

- fake-quant: ModelOpt's Q->DQ simulation (the quality preview: float32 copies of the quantized towers, twice a
  float16 checkpoint's memory, beside the original).
- fp8: FP8TextModel, FP8 weights in memory; FP8 matmuls on compute capability 8.9+, the work between them
  in fused Triton kernels, run as CUDA graphs; on-the-fly dequantization elsewhere (older GPUs, CPU).
- tensorrt: an engine built from the FP8 Q/DQ ONNX export (trt_runtime/).
`auto` is `fp8`, planned for the CLIP's load device (the TensorRT engine is a node of its own).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from . import artifact, fp8_fused, fp8_gemm
from .errors import FP8ClipError
from .fp8_ops import fp8_matmul_support, require_fp8_storage
from .fp8_encoder import FP8Runner
from .fp8_text_model import FP8TextModel
from .fp8_vision_model import FP8VisionModel
from .patching import clone_with, weight_bytes
from .proxy import drop_towers
from .vram import make_room

RUNTIMES = ("auto", "fp8", "fp8-compiled", "fake-quant", "tensorrt")
# Activations between the FP8 matmuls on GPUs (bench/results): text in fp32 (fp16 drifts further from the
# calibrated numbers and gains nothing on an overhead-bound 77-token encoder); vision in fp16 (2.05x vs 1.84x
# stock throughput at batch 64, same fidelity).
GPU_ACT_DTYPE = {"text": "float32", "vision": "float16"}


@dataclass(frozen=True)
class Plan:
    runtime: str  # "fp8" | "fake-quant" (the TensorRT runtime is planned by trt_runtime)
    matmul: str = "dequant"  # fp8: "scaled_mm" | "dequant"
    executor: str = "eager"  # fp8: "eager" | "cuda_graph" | "compiled"
    act_dtype: str = "float32"  # activations between the FP8 matmuls
    reason: str = ""
    kernels: str = "torch"  # fp8 matmuls: "fused" (fp8_fused's Triton kernels between them) | "torch"
    graphs: bool = True  # "cuda_graph" / "compiled": replay CUDA graphs (False: run the compiled code as is)


def compiled_in_graphs() -> tuple[bool, str]:
    """Whether torch.compile's kernels can be captured in CUDA graphs here, and why not.

    Not with PyTorch's cudaMallocAsync allocator, ComfyUI's default on NVIDIA GPUs: memory allocated during
    a capture has no address until the graph runs, and Triton's launcher refuses such pointers (seen in
    ComfyUI v0.29's server on an H100: the capture failed, and freeing its tensors later aborted the process).
    The pack's own fused kernels are given only buffers made before the capture (fp8_fused.Workspace)."""
    if torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return False, "PyTorch's cudaMallocAsync allocator (ComfyUI's default; --disable-cuda-malloc turns it off)"
    return True, ""


def plan(requested: str, device: torch.device, compile_ok: bool | None = None, kind: str = "text") -> Plan:
    if requested not in RUNTIMES:
        raise FP8ClipError(f"Unknown runtime {requested!r}. Use one of: {', '.join(RUNTIMES)}.")
    if requested == "fake-quant":
        return Plan("fake-quant", reason="quality preview: FP8 numerics simulated on float32 copies of the quantized "
                                         "towers (twice a float16 checkpoint's memory)")
    if requested == "tensorrt":
        raise FP8ClipError("Use the 'Build TensorRT Engine for FP8 CLIP' node for the TensorRT runtime.")
    require_fp8_storage(device)
    ok, why = fp8_matmul_support(device)
    if ok:
        if compile_ok is None:
            compile_ok = requested == "fp8-compiled"
        # CUDA graphs by default: ComfyUI's per-encode overhead dominates CLIP-L, and compiling costs
        # ~20 s on first use for little gain there (bench/results). "compiled" is opt-in.
        if compile_ok:  # torch.compile fuses the passes itself
            graphs, no_graphs = compiled_in_graphs()
            how = "compiled" if graphs else f"compiled, no CUDA graphs: {no_graphs}"
            return Plan("fp8", "scaled_mm", "compiled", GPU_ACT_DTYPE[kind], f"FP8 matmuls ({why}), {how}",
                        graphs=graphs)
        fused, no_triton = fp8_fused.available()
        how = (f"fused Triton kernels between them, fp32 accumulation up to {fp8_gemm.MAX_ROWS} rows" if fused
               else f"unfused quantization passes: {no_triton}")
        return Plan("fp8", "scaled_mm", "cuda_graph", GPU_ACT_DTYPE[kind],
                    f"FP8 matmuls ({why}), {how}, CUDA graphs", kernels="fused" if fused else "torch")
    if device.type == "cuda":
        return Plan("fp8", "dequant", "cuda_graph", GPU_ACT_DTYPE[kind], f"FP8 weights, dequantized per matmul: {why}")
    return Plan("fp8", "dequant", "eager", "float32", f"FP8 weights, dequantized per matmul: {why}")



def to_fp8_runtime(qclip: Any, requested: str = "auto", compile_ok: bool | None = None) -> tuple[Any, Plan]:
    """A clone of a fake-quant CLIP or CLIP_VISION whose quantized towers hold FP8 weights and run the
    planned kernels. Built completely before anything is swapped in: a failure (out of memory...) leaves
    the input as it was."""
    towers = artifact.quantized_towers(qclip)
    if not towers:
        raise FP8ClipError("This model is not quantized by this pack: connect the output of a 'Quantize ... to "
                           "FP8' node.")
    device = torch.device(qclip.patcher.load_device)
    p = plan(requested, device, compile_ok)
    if p.runtime == "fake-quant":
        return qclip, p
    size = qclip.patcher.model_size()
    swaps = {}
    for path, (module, record) in towers.items():
        if isinstance(module, FP8Runner):
            fp8 = module
        else:  # the FP8 copy is made where the calibrated tower is: ask ComfyUI for the room (at most its size)
            make_room(record.source_bytes, next(module.parameters()).device, (qclip.patcher,))
            if record.tower == "vision_model":
                fp8 = FP8VisionModel.from_quantized(module, record.scales, record.dtype)
            else:
                fp8 = FP8TextModel.from_quantized(module, record.scales, record.recipe.fp8_embedding, record.dtype)
            # All of it where ComfyUI keeps models it is not running: it was made partly on the calibration
            # device (the matmuls) and partly in RAM (norms, embeddings), and the proxy moves a tower by its first
            # tensor (a GPU half was kept as the "host" copy, on the GPU for good).
            fp8.to(qclip.patcher.offload_device)
        artifact.attach(fp8, record)
        if p.kernels == "fused":
            ok, why = fp8_fused.fusable(fp8.encoder_layers())
            if not ok:
                p = replace(p, kernels="torch", reason=f"{p.reason}; {path} unfused: {why}")
        kind = "vision" if isinstance(fp8, FP8VisionModel) else "text"
        fp8.configure(lambda d, r=requested, c=compile_ok, k=kind: plan(r, d, c, k))
        fp8.load_device = device
        size += weight_bytes(fp8) - record.source_bytes
        swaps[path] = fp8
    out = clone_with(qclip, swaps)
    # A child of the CLIP the fake-quant clone came from: a reference to that clone would keep its fp32
    # calibration copy alive as long as this CLIP lives.
    out.patcher.parent = getattr(qclip.patcher, "parent", None) or qclip.patcher
    out.patcher.size = size  # what ComfyUI's memory management budgets for this clone
    return out, p


def verify(reference_clip: Any, runtime_clip: Any, prompts: list[str], drop_reference: bool = False) -> float:
    """Worst conditioning cosine of `runtime_clip` against `reference_clip` (the Q->DQ model) on `prompts`.
    One model after the other, not alternating: each switch moves their towers (SDXL's fp32 copy: 3.3 GB).
    `drop_reference`: the reference's towers are let go once its outputs are taken (it is not used again)."""
    from .calibrate import encode
    from .fidelity import score

    want = [encode(reference_clip, p) for p in prompts]
    if drop_reference:
        drop_towers(reference_clip.patcher, artifact.quantized_towers(reference_clip))
    return min(score(p, w, encode(runtime_clip, p)).cond_cosine for p, w in zip(prompts, want))


def verify_vision(reference: Any, runtime_cv: Any, images: torch.Tensor, drop_reference: bool = False) -> float:
    """Worst image_embeds cosine of `runtime_cv` against `reference` (the Q->DQ model) on `images`."""
    from .vision import embed

    want = embed(reference, images)[0]
    if drop_reference:
        drop_towers(reference.patcher, artifact.quantized_towers(reference))
    return float(torch.nn.functional.cosine_similarity(want, embed(runtime_cv, images)[0], dim=-1).min())


def describe(model: Any, p: Plan, fidelity: float | None, checked: int, what: str = "conditioning",
             unit: str = "prompts") -> str:
    size = model.patcher.model_size()
    lines = [f"Runtime: {p.runtime} ({p.reason})"]
    towers = artifact.quantized_towers(model)
    src = sum(r.source_bytes for _, r in towers.values())
    now = sum(weight_bytes(m) for m, _ in towers.values())
    if p.runtime == "fp8" and src:
        lines.append(f"  weights in memory: {now / 2**20:.0f} MiB for the quantized parts ({now / src:.2f}x of "
                     f"{src / 2**20:.0f} MiB), {size / 2**20:.0f} MiB for the whole model")
    if fidelity is not None:
        lines.append(f"  matches the calibrated Q->DQ model: worst {what} cosine {fidelity:.5f} "
                     f"on {checked} held-out {unit}")
    return "\n".join(lines)
