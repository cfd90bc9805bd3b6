"""Fused Triton kernels for the work between the FP8 matmuls of a CLIP encoder layer.

Run as separate PyTorch ops, the activation quantization costs extra passes over the activations before each
FP8 matmul (LayerNorm, scale, clamp, cast) and after it (bias, GELU, residual add): ~34 kernels per layer on
an encoder whose 77-token matmuls take a few microseconds each. Here each gap between two matmuls is one
kernel:

    residual += y + bias; LayerNorm; -> FP8 codes      (before q/k/v, before fc1)
    y + bias; GELU; -> FP8 codes                        (between fc1 and fc2)
    q, k, v + biases; attention; -> FP8 codes           (before out_proj: up to 128 tokens, CLIP text)

On the GPU, up to fp8_gemm.MAX_ROWS rows, the matmuls are fp8_gemm's fp32-accumulating kernel: q, k and v
in one launch, and fc1 with its bias, GELU and fc2's quantizer in its epilogue (the second line above, then,
is not a kernel of its own). For longer sequences (vision: 257 tokens) the host's attention runs between a
q/k/v-bias kernel and a quantizing kernel. The arithmetic is the unfused path's (fp32, the bias and residual
adds in the same order); reductions, `exp` and the attention's sums round differently in the last bit. FP8
rounding is done in fp32 bit arithmetic (round to nearest even), so the final cast is exact: the same codes as
PyTorch's cast, also in Triton's CPU interpreter (whose own FP8 cast rounds wrongly at binade edges), where CI
runs these kernels.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import fp8_gemm
from .fp8_ops import FP8, FP8Linear
from .fp8_triton import ACT_CODE, IMPORT_ERROR, triton

if triton is not None:
    import triton.language as tl

    from .fp8_triton import activation, fp8_codes


def available() -> tuple[bool, str]:
    """Whether the fused kernels can run here, and why not."""
    return (triton is not None), IMPORT_ERROR


def fusable(layers: Any) -> tuple[bool, str]:
    """Whether `layers` (FP8 encoder layers, see fp8_encoder.build_layers) can run fused, and why not."""
    ok, why = available()
    if not ok:
        return False, why
    for i, layer in enumerate(layers):
        a = layer.self_attn
        projs = (a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.mlp.fc1, layer.mlp.fc2)
        if not all(isinstance(p, FP8Linear) and p.input_scale is not None and p.bias is not None for p in projs):
            return False, f"layer {i} has matmuls kept in high precision"
        if len({float(p.input_scale_inv) for p in projs[:3]}) != 1:
            return False, f"layer {i}: q, k and v have different input scales"
        if layer.mlp.activation_name not in ACT_CODE:
            return False, f"layer {i}: unknown MLP activation"
    return True, ""


if triton is not None:

    @triton.jit
    def _residual_ln_quant_kernel(res_ptr, y_ptr, bias_ptr, out_res_ptr, w_ptr, b_ptr, codes_ptr, inv_ptr,
                                  n_cols, eps, HAS_Y: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        h = tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)
            h = h + (y + bias)
            tl.store(out_res_ptr + row * n_cols + cols, h, mask=m)
        if QUANT:
            mean = tl.sum(h, axis=0) / n_cols
            d = tl.where(m, h - mean, 0.0)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / n_cols + eps)
            w = tl.load(w_ptr + cols, mask=m, other=0.0)
            b = tl.load(b_ptr + cols, mask=m, other=0.0)
            z = d * rstd * w + b
            tl.store(codes_ptr + row * n_cols + cols, fp8_codes(z, tl.load(inv_ptr)), mask=m)

    @triton.jit
    def _bias_act_quant_kernel(y_ptr, bias_ptr, codes_ptr, inv_ptr, n, n_cols, ACT: tl.constexpr,
                               BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = x + tl.load(bias_ptr + offs % n_cols, mask=m, other=0.0).to(tl.float32)
        tl.store(codes_ptr + offs, fp8_codes(activation(x, ACT), tl.load(inv_ptr)), mask=m)

    @triton.jit
    def _quant_kernel(x_ptr, codes_ptr, inv_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(codes_ptr + offs, fp8_codes(x, tl.load(inv_ptr)), mask=m)

    @triton.jit
    def _qkv_bias_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, oq_ptr, ok_ptr, ov_ptr, n, n_cols,
                         BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        c = offs % n_cols
        which = tl.program_id(1)
        if which == 0:
            y = tl.load(q_ptr + offs, mask=m, other=0.0) + tl.load(bq_ptr + c, mask=m, other=0.0)
            tl.store(oq_ptr + offs, y, mask=m)
        elif which == 1:
            y = tl.load(k_ptr + offs, mask=m, other=0.0) + tl.load(bk_ptr + c, mask=m, other=0.0)
            tl.store(ok_ptr + offs, y, mask=m)
        else:
            y = tl.load(v_ptr + offs, mask=m, other=0.0) + tl.load(bv_ptr + c, mask=m, other=0.0)
            tl.store(ov_ptr + offs, y, mask=m)


    @triton.jit
    def _attention_quant_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, mask_ptr, codes_ptr, inv_ptr,
                                n_tokens, n_heads, width, scale, mask_sb, mask_sq, HAS_MASK: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                PRECISION: tl.constexpr):
        """Softmax attention of one head for BLOCK_M queries over all (<= BLOCK_N) keys, on the q/k/v matmul
        outputs plus their biases, in fp32 (PRECISION "tf32x3": tensor cores at about fp32 accuracy, or
        "ieee"); written as FP8 codes for out_proj in the [B, T, heads * HEAD_DIM] layout it reads."""
        b = tl.program_id(0) // n_heads
        h = tl.program_id(0) % n_heads
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        keys = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        base = b.to(tl.int64) * n_tokens * width + h * HEAD_DIM
        q = tl.load(q_ptr + base + rows[:, None] * width + dims[None, :], mask=rows[:, None] < n_tokens, other=0.0)
        k = tl.load(k_ptr + base + keys[:, None] * width + dims[None, :], mask=keys[:, None] < n_tokens, other=0.0)
        v = tl.load(v_ptr + base + keys[:, None] * width + dims[None, :], mask=keys[:, None] < n_tokens, other=0.0)
        q = q.to(tl.float32) + tl.load(bq_ptr + h * HEAD_DIM + dims).to(tl.float32)[None, :]
        k = k.to(tl.float32) + tl.load(bk_ptr + h * HEAD_DIM + dims).to(tl.float32)[None, :]
        v = v.to(tl.float32) + tl.load(bv_ptr + h * HEAD_DIM + dims).to(tl.float32)[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_MASK:
            s = s + tl.load(mask_ptr + b * mask_sb + rows[:, None] * mask_sq + keys[None, :],
                            mask=(rows[:, None] < n_tokens) & (keys[None, :] < n_tokens), other=0.0)
        s = tl.where(keys[None, :] < n_tokens, s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        o = tl.dot(p, v, input_precision=PRECISION) / tl.sum(p, axis=1)[:, None]
        tl.store(codes_ptr + base + rows[:, None] * width + dims[None, :], fp8_codes(o, tl.load(inv_ptr)),
                 mask=rows[:, None] < n_tokens)


_ELEMENTWISE_BLOCK = 1024
ATTENTION_BLOCK_M = 16  # queries a program
# Own attention kernel up to this many tokens (CLIP text: 77; every key of a query in one block). Longer
# sequences (vision: 257) use the host's attention, whose flash/memory-efficient kernels suit them.
ATTENTION_MAX_TOKENS = 128


class Fresh:
    """Where run_layers gets the tensors its kernels write: new ones on every request (outside a capture)."""

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def stage(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t`, in memory a kernel may be given."""
        return t.contiguous()


FRESH = Fresh()


class Workspace(Fresh):
    """Buffers made before a CUDA-graph capture, for every tensor the kernels are given during it.

    Under cudaMallocAsync (ComfyUI's default allocator on NVIDIA GPUs) memory allocated in a capture has no
    address until the graph runs, and Triton's launcher refuses such pointers ("Pointer argument cannot be
    accessed from Triton"). A warm-up run outside the capture allocates the buffers; the capture reuses them,
    and anything else made in it (a host attention's output, the causal mask) is copied in. One set per model,
    as large as its largest captured shape: its graphs replay one at a time on one stream, so they share it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.device: torch.device | None = None  # of the buffers
        self.grown = False  # set when a buffer was (re)allocated: graphs captured before read the old one
        self.sealed = False  # during the capture: allocating then is a bug

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            if self.sealed:
                raise RuntimeError(f"fused kernels: workspace buffer {name!r} {tuple(shape)} was not made before "
                                   "the CUDA-graph capture")
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
            self.grown, self.device = True, buf.device
        return buf[:n].view(shape)

    def stage(self, name: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.empty(name, tuple(t.shape), t.dtype, t.device)
        buf.copy_(t)
        return buf


def _row_launch(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8}


def residual_ln_quant(h: torch.Tensor, y: torch.Tensor | None, bias: torch.Tensor | None,
                      ln: torch.nn.LayerNorm | None, inv_scale: torch.Tensor | None,
                      out: torch.Tensor | None = None, codes: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h + (y + bias) if y is given, else h; FP8 codes of LayerNorm of that if `ln` is given), rows of 2-D h.
    `out` may be `h` itself (each row is read before it is written)."""
    rows, n_cols = h.shape
    if y is None:
        out = h
    elif out is None:
        out = torch.empty_like(h)
    if ln is not None and codes is None:
        codes = torch.empty((rows, n_cols), dtype=FP8, device=h.device)
    dummy = h  # pointer for arguments a variant does not read
    _residual_ln_quant_kernel[(rows,)](
        h, y if y is not None else dummy, bias if bias is not None else dummy, out,
        ln.weight if ln is not None else dummy, ln.bias if ln is not None else dummy,
        codes if ln is not None else dummy, inv_scale if inv_scale is not None else dummy,
        n_cols, float(ln.eps) if ln is not None else 0.0,
        HAS_Y=y is not None, QUANT=ln is not None, **_row_launch(n_cols))
    return out, codes if ln is not None else None


def bias_act_quant(y: torch.Tensor, bias: torch.Tensor, activation: str, inv_scale: torch.Tensor,
                   codes: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 codes of activation(y + bias); `activation` a name from quant.activations."""
    if codes is None:
        codes = torch.empty(y.shape, dtype=FP8, device=y.device)
    n = y.numel()
    _bias_act_quant_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
        y, bias, codes, inv_scale, n, y.shape[-1], ACT=ACT_CODE[activation], BLOCK=_ELEMENTWISE_BLOCK)
    return codes


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).contiguous()
    if codes is None:
        codes = torch.empty(x.shape, dtype=FP8, device=x.device)
    n = x.numel()
    _quant_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](x, codes, inv_scale, n, BLOCK=_ELEMENTWISE_BLOCK)
    return codes


def qkv_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: tuple, dtype: torch.dtype,
             outs: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v plus their biases, in `dtype`: in place if that is their dtype, else in `outs` (or new tensors)."""
    if dtype == q.dtype:
        outs = (q, k, v)
    elif outs is None:
        outs = tuple(torch.empty(q.shape, dtype=dtype, device=q.device) for _ in range(3))
    n = q.numel()
    _qkv_bias_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK), 3)](q, k, v, *biases, *outs, n, q.shape[-1],
                                                              BLOCK=_ELEMENTWISE_BLOCK)
    return outs


def attention_quant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: tuple, shape: tuple[int, int, int],
                    heads: int, mask: torch.Tensor | None, inv_scale: torch.Tensor, block_m: int | None = None,
                    precision: str = "tf32x3", num_warps: int = 4, codes: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """FP8 codes of softmax(q' k'^T / sqrt(d) + mask) v' with q' = q + bias_q..., for q, k, v [B*T, D]
    (D = heads * d), as [B*T, D]. `mask`: additive, [T, T] or [B, 1, T, T], as ComfyUI's CLIP passes it."""
    b, t, width = shape
    head_dim = width // heads
    block_m = block_m or ATTENTION_BLOCK_M
    if codes is None:
        codes = torch.empty((b * t, width), dtype=FP8, device=q.device)
    sb = 0
    if mask is not None:
        mask = mask.to(torch.float32).reshape(-1, t, t).contiguous()  # [1 or B, T, T]
        sb = t * t if mask.shape[0] > 1 else 0
    # Defaults measured on an H200 (bench/results/raw_h200/attention_probe.txt): 6.4 us a layer at batch 1,
    # against 12.4 us with IEEE products and 22.4 us for the host's SDPA between a bias and a quantizing kernel;
    # tf32x3's codes differ from fp64 attention's as often as IEEE's (17 per million).
    _attention_quant_kernel[(b * heads, triton.cdiv(t, block_m))](
        q, k, v, *biases, mask if mask is not None else q, codes, inv_scale, t, heads, width, head_dim ** -0.5, sb, t,
        HAS_MASK=mask is not None, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(t)),
        PRECISION=precision, num_warps=num_warps)
    return codes


def own_attention(t: int, width: int, heads: int) -> bool:
    head_dim = width // heads
    return t <= ATTENTION_MAX_TOKENS and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _gemm(launch: Any) -> bool:
    """Run an fp8_gemm launch; False when its kernel fails here (fp8_gemm is then off for the process and the
    caller runs cuBLAS), so that a GPU Triton cannot build it for keeps the other fused kernels."""
    try:
        launch()
        return True
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a compile or launch failure of this kernel only
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        fp8_gemm.disable(f"{type(e).__name__}: {e}")
        return False


def _matmul(codes: torch.Tensor, lin: FP8Linear, out: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 x FP8 -> fp32 without bias: the bias is added by the kernel after it. On the GPU up to
    fp8_gemm.MAX_ROWS rows on fp16 tensor cores with fp32 accumulation (as the Q->DQ model sums), on FP8
    tensor cores beyond."""
    if out is None:
        out = torch.empty((codes.shape[0], lin.weight.shape[0]), dtype=torch.float32, device=codes.device)
    if fp8_gemm.exact_for(codes, lin.weight) and _gemm(
            lambda: fp8_gemm.matmul(codes, lin.weight, lin.input_scale, lin.weight_scale, out)):
        return out
    return torch._scaled_mm(codes, lin.weight.t(), scale_a=lin.input_scale, scale_b=lin.weight_scale,
                            out_dtype=torch.float32, out=out)


def run_layers(x: torch.Tensor, layers: Any, mask: torch.Tensor | None, inter_idx: int | None,
               act_dtype: torch.dtype, buffers: Fresh = FRESH) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder layers on fp32 hidden states `x` [B, T, D]: (hidden states after the last layer, after layer
    `inter_idx`). Up to ATTENTION_MAX_TOKENS tokens the attention is this module's fp32 kernel; beyond, each
    layer's own (the host's) attention function, in `act_dtype`. Every tensor a kernel is given comes from
    `buffers` (a Workspace while a CUDA graph is captured) or is a weight."""
    b, t, d = x.shape
    m, dev = b * t, x.device
    ffn = layers[0].mlp.fc1.weight.shape[0]
    h = buffers.empty("hidden", (m, d), torch.float32, dev)  # the residual stream, updated in place
    h.copy_(x.reshape(m, d))
    own = own_attention(t, d, layers[0].self_attn.heads)
    if mask is not None and own:
        mask = buffers.stage("mask", mask.to(torch.float32).reshape(-1, t, t))
    # Every matmul's output in one buffer: only one is alive at a time, q, k and v excepted.
    gemm = buffers.empty("matmul", (m * max(3 * d, ffn),), torch.float32, dev)
    q_out, k_out, v_out = (gemm[i * m * d:(i + 1) * m * d].view(m, d) for i in range(3))
    y_d, y_ffn = gemm[:m * d].view(m, d), gemm[:m * ffn].view(m, ffn)
    codes_d = buffers.empty("codes", (m, d), FP8, dev)  # FP8 inputs of q/k/v, out_proj and fc1, in turn
    codes_ffn = buffers.empty("codes_ffn", (m, ffn), FP8, dev)
    first = layers[0]
    residual_ln_quant(h, None, None, first.layer_norm1, first.self_attn.q_proj.input_scale_inv, codes=codes_d)
    inter = None
    for i, layer in enumerate(layers):
        a, mlp = layer.self_attn, layer.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj)
        qkv = gemm[:3 * m * d].view(3, m, d)
        if fp8_gemm.exact_for(codes_d, *(p.weight for p in projs)) and _gemm(
                lambda: fp8_gemm.matmul_projections(codes_d, projs, qkv)):  # one launch, q, k and v in turn
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (_matmul(codes_d, p, o) for p, o in zip(projs, (q_out, k_out, v_out)))
        biases = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
        if own:
            attention_quant(q, k, v, biases, (b, t, d), a.heads, mask, a.out_proj.input_scale_inv, codes=codes_d)
        else:
            outs = None if act_dtype == torch.float32 else buffers.empty("qkv", (3, m, d), act_dtype, dev).unbind(0)
            q, k, v = qkv_bias(q, k, v, biases, act_dtype, outs)
            o = a.attention(q.view(b, t, d), k.view(b, t, d), v.view(b, t, d), a.heads,
                            None if mask is None else mask.to(act_dtype))
            quantize(buffers.stage("attention", o.reshape(m, d)), a.out_proj.input_scale_inv, codes=codes_d)
        residual_ln_quant(h, _matmul(codes_d, a.out_proj, y_d), a.out_proj.bias, layer.layer_norm2,
                          mlp.fc1.input_scale_inv, out=h, codes=codes_d)
        if not (fp8_gemm.exact_for(codes_d, mlp.fc1.weight) and _gemm(  # fc1 + bias, GELU, fc2's quantizer
                lambda: fp8_gemm.matmul_act_quant(codes_d, mlp.fc1, mlp.activation_name, mlp.fc2.input_scale_inv,
                                                  codes_ffn))):
            bias_act_quant(_matmul(codes_d, mlp.fc1, y_ffn), mlp.fc1.bias, mlp.activation_name,
                           mlp.fc2.input_scale_inv, codes=codes_ffn)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        residual_ln_quant(h, _matmul(codes_ffn, mlp.fc2, y_d), mlp.fc2.bias,
                          None if nxt is None else nxt.layer_norm1,
                          None if nxt is None else nxt.self_attn.q_proj.input_scale_inv, out=h, codes=codes_d)
        if i == inter_idx:
            inter = h.clone().view(b, t, d)
    return h.view(b, t, d), inter
