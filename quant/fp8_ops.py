"""FP8 E4M3 layers that hold FP8 weights in memory: ComfyUI's quantized-file layout, real FP8 math.

`FP8Linear` keeps `weight` (float8_e4m3fn), `weight_scale`, `input_scale` (fp32 scalars, amax/448) and
`bias`: the names ComfyUI's quantized safetensors use; plus `input_scale_inv` (448/amax), the multiplier
ModelOpt quantizes inputs with, which 1/input_scale misses by an ulp for some layers. Two ways to run it:
- `scaled_mm`: the input is quantized with the calibrated static scale and multiplied in FP8 by
  `torch._scaled_mm` (FP8 tensor cores: compute capability 8.9+; also exact on the CPU, but slow there);
- `dequant`: the weight is dequantized on the fly (any GPU, CPU); the input goes through the same Q->DQ as
  in calibration, so both modes give the numerics the quality report measured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import FP8ClipError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_fp8(w: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_input(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x -> FP8 with a static per-tensor scale, multiplying by 1/scale as ModelOpt does (same rounding)."""
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fake_quant(x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q->DQ: what ModelOpt's FP8 input quantizer computes."""
    return (quantize_input(x, inv_scale).float() * scale).to(x.dtype)


def require_fp8_storage(device: torch.device, what: str = "CLIP") -> None:
    """Refuse a device that cannot hold float8 tensors (ComfyUI's `supports_cast` says the same): calibration
    (ModelOpt's Q->DQ casts to float8) and FP8 weights both need them. ComfyUI puts text and image encoders
    there only with --gpu-only; not verified on such a device here."""
    device = torch.device(device)
    names = {"mps": "Apple GPUs (MPS)", "privateuseone": "DirectML devices"}
    if device.type in names:
        raise FP8ClipError(f"ComfyUI runs this {what} on {device.type}, and {names[device.type]} cannot hold the "
                           "float8 tensors that FP8 calibration and FP8 weights need. Run the encoder on the CPU "
                           "instead: start ComfyUI without --gpu-only (or pick device 'cpu' in the CLIP loader).")


def fp8_matmul_support(device: torch.device) -> tuple[bool, str]:
    """Whether `torch._scaled_mm` runs FP8 tensor-core matmuls on `device`, and why (not)."""
    if device.type != "cuda":
        return False, f"{device.type} has no FP8 tensor cores"
    if torch.version.hip:  # ROCm reports its gfx generation as the capability: gfx1100 would read as 11.0
        return False, (f"{torch.cuda.get_device_name(device)} is an AMD GPU (ROCm): this pack's FP8 matmuls use "
                       "NVIDIA's float8_e4m3fn tensor-core format")
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return False, f"{name} is compute capability {major}.{minor}; FP8 matmuls need 8.9+ (Ada, Hopper, Blackwell)"
    return True, f"{name} (compute capability {major}.{minor}) has FP8 tensor cores"


class FP8Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, weight_scale: float, input_scale: float | None,
                 bias: torch.Tensor | None, input_scale_inv: float | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Parameters, not buffers: ComfyUI's loader moves and counts parameters.
        self.weight = torch.nn.Parameter(weight if weight.dtype == FP8 else to_fp8(weight, weight_scale),
                                         requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.tensor(float(weight_scale), dtype=torch.float32),
                                               requires_grad=False)
        self.input_scale = None if input_scale is None else torch.nn.Parameter(
            torch.tensor(float(input_scale), dtype=torch.float32), requires_grad=False)
        inv = None
        if input_scale is not None:
            inv = torch.tensor(float(input_scale_inv), dtype=torch.float32) if input_scale_inv is not None \
                else 1.0 / self.input_scale.detach()  # files of format 1 did not store it
        self.register_buffer("input_scale_inv", inv)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.mode = "dequant"

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, weight_scale: float, input_scale: float | None,
                    input_scale_inv: float | None = None) -> "FP8Linear":
        w = linear.weight.detach()
        b = None if linear.bias is None else linear.bias.detach().float()
        return cls(w, weight_scale, input_scale, b, input_scale_inv)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, mode={self.mode}, "
                f"activations={'fp8' if self.input_scale is not None else 'high precision'}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device != x.device:  # a layer used on its own, outside the model that places it
            return self._forward_dequant(x, self.weight.to(x.device))
        if self.mode == "scaled_mm" and self.input_scale is not None:
            return self._forward_scaled_mm(x)
        return self._forward_dequant(x, self.weight)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul_quantized(self.quantize(x), x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as FP8 codes with this layer's static input scale, flattened to 2-D (scaled_mm's operand)."""
        return quantize_input(x.reshape(-1, x.shape[-1]), self.input_scale_inv)

    def matmul_quantized(self, xq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The FP8 matmul on codes from `quantize(x)` (possibly shared by layers with the same input scale)."""
        shape = x.shape
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        bias = None if self.bias is None else self.bias.to(out_dtype)
        if out_dtype == torch.float32 and bias is not None:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 out_dtype=out_dtype) + bias
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=bias, out_dtype=out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_dequant(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(x.dtype) * self.weight_scale.to(x.device, x.dtype)
        if self.input_scale is not None:
            x = fake_quant(x, self.input_scale_inv.to(x.device), self.input_scale.to(x.device))
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, w, b)


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """One FP8 scale per row of a table, [rows, 1]. The same on every device: divided by a tensor, not by the
    number 448, which a GPU turns into a multiply by its reciprocal (an ulp off for ~46% of CLIP-L's rows), so a
    table quantized on the GPU (a remembered calibration rebuilt there) equals one quantized in RAM."""
    amax = w.abs().amax(dim=1, keepdim=True)
    return (amax / torch.full_like(amax, FP8_MAX)).clamp(min=1e-12)


class FP8Embedding(torch.nn.Module):
    """Token embedding table in FP8 with one scale per row; lookups dequantize only the rows they read.

    Keeps the call of ComfyUI's Embedding (`out_dtype=`), which the textual-inversion path uses.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        """`scale`: the per-row scales a Q->DQ table was made with (`row_scales` of the original table). Derived
        again from the Q->DQ table, a scale can come out an ulp off (a GPU divides by the constant 448 as a
        multiply by its reciprocal), and that ulp changes FP8 roundings throughout the encoder."""
        super().__init__()
        w = weight.detach().float()
        scale = row_scales(w) if scale is None else scale.detach().float().to(w.device).reshape(-1, 1)
        self.weight = torch.nn.Parameter(to_fp8(w, scale), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.squeeze(1), requires_grad=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, input: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        idx = input.to(self.weight.device)
        rows = F.embedding(idx, self.weight.view(torch.uint8)).view(FP8)
        out = rows.float() * self.weight_scale[idx].unsqueeze(-1)
        return out.to(device=input.device, dtype=out_dtype or torch.float32)
