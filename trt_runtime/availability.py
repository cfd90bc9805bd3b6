"""Can an FP8 engine run here, and for which GPU should it be built? One answer with a reason a user can act on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .flavour import RTX, STANDARD, Flavour, find_tensorrt

# FP8 GEMMs need FP8 tensor cores. TensorRT for RTX runs engines on 8.0/8.6/8.9/12.0/12.1 but FP8 only on
# 8.9 (Ada) and 12.x (Blackwell); its builder refuses FP8 for sm86 ("HW-specific datatypes: fp8_e4m3"), and
# its runtime refuses 9.0 (H100/H200). Standard TensorRT runs FP8 on 8.9+ including Hopper.
RTX_FP8_CC = {(8, 9), (12, 0), (12, 1)}
STANDARD_MIN_CC = (8, 9)

PORTABLE = "portable"  # TensorRT for RTX's default: one engine for every GPU it supports


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str  # why not (or, when ok, what it will run on)
    flavour: Flavour | None = None
    target: str = ""  # part of the cache key: "sm89", "sm90-NVIDIA H100 80GB HBM3", PORTABLE...
    device: torch.device | None = None


def engine_support(device: torch.device | str | None = None, flavour: Flavour | None = None) -> Support:
    """Whether an FP8 engine can run on `device` (ComfyUI's torch device) with the installed TensorRT. The
    device first: where no engine could run, installing TensorRT would not help, and the reason says so."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        where = "no device" if device is None else f"'{device}'"
        return Support(False, f"ComfyUI runs this model on {where}, not a CUDA GPU: TensorRT engines need "
                              "an NVIDIA GPU.", flavour)
    if not torch.cuda.is_available():
        return Support(False, "CUDA is not available to torch (no NVIDIA driver or a CPU-only torch build).",
                       flavour)
    if torch.version.hip:  # ROCm's torch.cuda is an AMD GPU, whose "capability" is its gfx generation
        return Support(False, "This is an AMD GPU (ROCm): TensorRT engines run on NVIDIA GPUs only.", flavour,
                       device=device)
    cc = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    gpu = f"{name} (compute capability {cc[0]}.{cc[1]})"
    if cc < STANDARD_MIN_CC:
        return Support(False, f"{gpu} has no FP8 tensor cores (FP8 engines need compute capability 8.9+: Ada, "
                              "Hopper, Blackwell).", flavour, device=device)
    if flavour is None:
        flavour, why = find_tensorrt()
        if flavour is None:
            return Support(False, why, device=device)
    if flavour.name == RTX:
        if cc not in RTX_FP8_CC:
            return Support(False, f"{flavour.label} cannot run FP8 engines on {gpu}: it runs FP8 on compute "
                                  "capability 8.9 and 12.x only. Standard TensorRT 10.2+ (`pip install "
                                  "tensorrt`) runs FP8 engines on this GPU.", flavour, device=device)
        return Support(True, f"{flavour.label} on {gpu}", flavour, f"sm{cc[0]}{cc[1]}", device)
    # Standard TensorRT engines are specific to the GPU model they were built on.
    return Support(True, f"{flavour.label} on {gpu}", flavour, f"sm{cc[0]}{cc[1]}-{name}", device)


def build_only_support(flavour: Flavour | None = None) -> Support:
    """For building without a GPU (CI, benchmarks): TensorRT for RTX's portable engine."""
    if flavour is None:
        flavour, why = find_tensorrt(prefer=RTX)
        if flavour is None:
            return Support(False, why)
    if flavour.name == STANDARD:
        return Support(False, "Standard TensorRT builds engines only on the GPU they will run on.", flavour)
    return Support(True, f"{flavour.label}, portable engine (built without a GPU)", flavour, PORTABLE)
