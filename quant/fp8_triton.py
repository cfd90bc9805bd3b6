"""Triton device functions shared by the fused kernels (fp8_fused.py) and the matmul (fp8_gemm.py): the FP8
rounding of ModelOpt's quantizer and CLIP's MLP activations."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - any import failure means: no Triton kernels
    triton = None
    IMPORT_ERROR = f"Triton is not importable ({type(e).__name__}: {e})"
else:
    IMPORT_ERROR = ""

ACT_CODE = {"quick_gelu": 0, "gelu": 1, "gelu_pytorch_tanh": 2}

if triton is not None:

    @triton.jit
    def fp8_codes(v, inv):
        """v * inv -> float8_e4m3fn codes as ModelOpt's quantizer computes them (clamp to +-448, round to
        nearest even)."""
        v = v * inv
        nan = v != v  # NaN stays NaN, as in PyTorch's cast (clamp would make it -448: finite garbage downstream)
        v = tl.clamp(v, -448.0, 448.0)
        # Normal range (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits, rounding to nearest even; a carry into
        # the exponent is the right result. Subnormal range: multiples of 2^-9, by an fp32 add at a magnitude
        # whose ulp is 2^-9 (1.5 * 2^14), with v's sign put back (-0 stays -0, as in PyTorch's cast).
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        sub = (tl.abs(v) + 24576.0) - 24576.0
        sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
        q = tl.where(tl.abs(v) >= 0.015625, normal, sub).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        return tl.where(nan, 0x7F, q).to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def activation(x, ACT: tl.constexpr):
        """CLIP's MLP activation (ACT_CODE) of fp32 x, as quant.activations computes it."""
        if ACT == 0:  # quick_gelu, as CLIP-L computes it
            x = x * (1.0 / (1.0 + tl.exp(-1.702 * x)))
        elif ACT == 1:
            x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        else:
            u = tl.clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -20.0, 20.0)  # tanh(20) is 1 in fp32
            x = 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
        return x
