"""The FP8 matmul of the fused encoder on the GPU: FP8 x FP8 -> fp32 in Triton, with fp32 accumulation.

Hopper's FP8 tensor-core instructions sum their products with about 14 bits of precision before the fp32
accumulator sees them: `torch._scaled_mm` errs by 2e-4 to 8e-4 of a CLIP matmul's output range against fp64 on
the same FP8 operands, and moves 6,000-9,000 elements per million across the next layer's FP8 rounding
boundary (bench/results/gemm_accumulation_h200.md). Here the FP8 codes are read from memory as they are (FP8
weights, FP8 activations with the calibrated static scales) and widened to fp16 in registers, which is exact
(every E4M3 value is an fp16), then multiplied on fp16 tensor cores with fp32 accumulation: 2e-7 to 9e-7, 0-4
flips per million, as exact as an fp32 GEMM of the dequantized operands. At CLIP's text shapes the matmuls are
bound by latency, not by multiply rate: against cuBLAS's FP8 GEMM a CLIP-L layer's six matmuls take 23.5 vs
21.8 us at 77 rows, 28.5 vs 24.0 us at 154 and 48.6 vs 30.6 us at 616 (+0.02, +0.05 and +0.22 ms per encode).
Beyond MAX_ROWS (vision batches, text batches of over 8 prompts) `torch._scaled_mm` runs, and the numbers follow
its arithmetic (CLIP-L against the Q->DQ model: 0.9984 instead of 0.9990).

Two launches of the fused encoder (fp8_fused.run_layers) carry more than a matmul: q, k and v, which read the
same FP8 input, in one launch (a third grid axis picks the weight and its scales), and fc1 with its bias,
activation and fc2's input quantizer in the epilogue, writing FP8 codes instead of fp32.

Modes "fp8" (the FP8 instruction accumulating in place, as cuBLAS does) and "fp8-promoted" (each K block's FP8
product added in fp32, as DeepSeek-V3 promotes) are kept for bench/probe_gemm_accumulation.py's comparison.
"""
from __future__ import annotations

import logging

import torch

from .fp8_ops import FP8
from .fp8_triton import ACT_CODE, triton

if triton is not None:
    import triton.language as tl

    from .fp8_triton import activation, fp8_codes

MODES = {"fp8": 0, "fp8-promoted": 1, "fp16": 2}
# Up to 8 prompts of 77 tokens: a fidelity choice (cuBLAS's FP8 GEMM is already faster from 154 rows on, 1.6x at
# 616); vision batches (2,056 rows for 8 images) stay on FP8 instructions, where they are 2.3-3.2x faster.
MAX_ROWS = 640
BLOCK_K = 128
log = logging.getLogger(__name__)
_disabled = ""  # why this kernel does not run here (it failed to build or launch): cuBLAS then

if triton is not None:

    @triton.jit
    def _matmul_kernel(a_ptr, w0_ptr, w1_ptr, w2_ptr, sa0_ptr, sa1_ptr, sa2_ptr, sb0_ptr, sb1_ptr, sb2_ptr,
                       out_ptr, bias_ptr, inv_ptr, m, n, k, MODE: tl.constexpr, CODES: tl.constexpr,
                       ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[g] = (a @ w_g.T) * sa_g * sb_g for the g-th weight (program_id 2: q, k and v in one launch), or
        with CODES the FP8 codes of activation(that + bias) * inv (fc1: its bias, GELU and fc2's quantizer)."""
        g = tl.program_id(2)
        w_ptr = w0_ptr
        sa_ptr = sa0_ptr
        sb_ptr = sb0_ptr
        if g == 1:
            w_ptr = w1_ptr
            sa_ptr = sa1_ptr
            sb_ptr = sb1_ptr
        elif g == 2:
            w_ptr = w2_ptr
            sa_ptr = sa2_ptr
            sb_ptr = sb2_ptr
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * k + rk[None, :]
        w_ptrs = w_ptr + rn[None, :] * k + rk[:, None]  # [BLOCK_K, BLOCK_N] of the [n, k] weight: K-major
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k, BLOCK_K):
            a = tl.load(a_ptrs, mask=rm[:, None] < m, other=0.0)
            w = tl.load(w_ptrs, mask=rn[None, :] < n, other=0.0)
            if MODE == 0:
                acc = tl.dot(a, w, acc)
            elif MODE == 1:
                acc += tl.dot(a, w, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a.to(tl.float16), w.to(tl.float16), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * (tl.load(sa_ptr) * tl.load(sb_ptr))
        ok = (rm[:, None] < m) & (rn[None, :] < n)
        offs = g.to(tl.int64) * m * n + rm[:, None] * n + rn[None, :]
        if CODES:
            y = acc + tl.load(bias_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs, fp8_codes(activation(y, ACT), tl.load(inv_ptr)), mask=ok)
        else:
            tl.store(out_ptr + offs, acc, mask=ok)


def block_for(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the fastest of the probe's configurations for this shape."""
    if m > 160:
        return 32, 64, BLOCK_K, 4, 3
    if k >= 2048 and k % 256 == 0:  # fc2: fewer, longer steps along K
        return 16, 32, 256, 4, 3
    return (16, 32, BLOCK_K, 4, 4) if n <= 1024 else (16, 64, BLOCK_K, 4, 3)


def exact_for(codes: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether this module takes the product of `codes` with each of `weights` (else `torch._scaled_mm` does)."""
    return (triton is not None and not _disabled and codes.is_cuda and codes.shape[0] <= MAX_ROWS
            and codes.shape[1] % BLOCK_K == 0 and codes.is_contiguous() and all(w.is_contiguous() for w in weights))


def disable(why: str) -> None:
    """Turn this kernel off for the process (it failed here: a GPU or Triton it does not build for)."""
    global _disabled
    if not _disabled:
        log.warning("FP8 CLIP: the fp32-accumulating FP8 matmul failed (%s); cuBLAS's FP8 GEMM runs instead", why)
    _disabled = why


def _launch(codes: torch.Tensor, lins: tuple, out: torch.Tensor, mode: str = "fp16", block: tuple | None = None,
            bias: torch.Tensor | None = None, act: str | None = None, inv_scale: torch.Tensor | None = None) -> None:
    m, k = codes.shape
    n = lins[0][0].shape[0]
    bm, bn, bk, warps, stages = block or block_for(m, n, k)
    if k % bk:
        raise ValueError(f"k={k} is not a multiple of the block's {bk}")
    (w0, sa0, sb0), (w1, sa1, sb1), (w2, sa2, sb2) = (lins * 3)[:3]
    _matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), len(lins))](
        codes, w0, w1, w2, sa0, sa1, sa2, sb0, sb1, sb2, out, bias if bias is not None else sa0,
        inv_scale if inv_scale is not None else sa0, m, n, k, MODE=MODES[mode], CODES=act is not None,
        ACT=ACT_CODE[act] if act is not None else 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)


def matmul(codes: torch.Tensor, weight: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
           out: torch.Tensor | None = None, mode: str = "fp16",
           block: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """codes [m, k] FP8 @ weight [n, k].T FP8, times the two per-tensor scales -> fp32 [m, n]."""
    if out is None:
        out = torch.empty((codes.shape[0], weight.shape[0]), dtype=torch.float32, device=codes.device)
    _launch(codes, ((weight, scale_a, scale_b),), out, mode, block)
    return out


def matmul_projections(codes: torch.Tensor, lins: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    """The products of `codes` with each FP8Linear of `lins` (q, k and v: same input, same shape), in one
    launch -> fp32 [len(lins), m, n], without their biases."""
    m, n = codes.shape[0], lins[0].weight.shape[0]
    if out is None:
        out = torch.empty((len(lins), m, n), dtype=torch.float32, device=codes.device)
    _launch(codes, tuple((p.weight, p.input_scale, p.weight_scale) for p in lins), out)
    return out


def matmul_act_quant(codes: torch.Tensor, lin, activation_name: str, inv_scale: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 codes of activation(codes @ lin + lin.bias) * inv_scale (fc1 into fc2's input), in one launch."""
    if out is None:
        out = torch.empty((codes.shape[0], lin.weight.shape[0]), dtype=FP8, device=codes.device)
    _launch(codes, ((lin.weight, lin.input_scale, lin.weight_scale),), out, bias=lin.bias, act=activation_name,
            inv_scale=inv_scale)
    return out
