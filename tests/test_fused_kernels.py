"""The Triton kernels between the FP8 matmuls (quant/fp8_fused.py), one by one against PyTorch.

Without a GPU they run in Triton's CPU interpreter (see conftest.py). The whole encoder on them is checked in
test_fp8_runtime.py; on the H200, bench/probe_fp8_fidelity.py compares their FP8 rounding with PyTorch's cast
on 5M values (0 differ) and bench/ measures their speed.
"""
from __future__ import annotations

import importlib

import pytest
import torch

fused = importlib.import_module("quant.fp8_fused")
ops = importlib.import_module("quant.fp8_ops")
GELUS = importlib.import_module("quant.activations").GELUS


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many FP8 values lie between two codes of the same sign (e4m3fn codes are ordered by magnitude)."""
    return (codes(a).int() & 0x7F) - (codes(b).int() & 0x7F)


def test_fp8_rounding_is_pytorchs_cast_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-4, 3e-3, 0.5, 30.0, 600.0)] +
                  [torch.tensor([0.0, -0.0, 448.0, 449.0, -1e9, 2.0 ** -10, 3 * 2.0 ** -10, -(2.0 ** -6),
                                 2.0 ** -6 - 2.0 ** -12, 464.0, 15.5, 17.0])])
    for inv in (1.0, 0.37, 448 / 7.3):
        inv_t = torch.tensor(inv, dtype=torch.float32)
        got = fused.quantize(x[None], inv_t)
        assert torch.equal(codes(got), codes(ops.quantize_input(x[None], inv_t))), inv


def test_residual_layernorm_quantize_matches_the_unfused_ops():
    g = torch.Generator().manual_seed(1)
    h, y = torch.randn(154, 768, generator=g) * 3, torch.randn(154, 768, generator=g)
    bias = torch.randn(768, generator=g)
    ln = torch.nn.LayerNorm(768)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=g)
        ln.bias.normal_(generator=g)
    inv = torch.tensor(448 / 6.0)
    with torch.no_grad():
        out, got = fused.residual_ln_quant(h, y, bias, ln, inv)
        ref_h = h + (y + bias)
        ref = ops.quantize_input(ln(ref_h), inv)
    assert torch.equal(out, ref_h)  # the residual stream: same adds in the same order
    # LayerNorm's sums run in another order: at most one FP8 step apart, and rarely
    d = steps_apart(got, ref).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3
    first, got0 = fused.residual_ln_quant(h, None, None, ln, inv)  # the first layer: no matmul before it
    assert first is h and steps_apart(got0, ops.quantize_input(ln(h), inv)).abs().max() <= 1
    last, none = fused.residual_ln_quant(h, y, bias, None, None)  # the last layer: no LayerNorm after it
    assert none is None and torch.equal(last, ref_h)


@pytest.mark.parametrize("activation", list(GELUS))
def test_bias_activation_quantize_matches_the_unfused_ops(activation):
    g = torch.Generator().manual_seed(2)
    y, bias = torch.randn(77, 3072, generator=g) * 3, torch.randn(3072, generator=g)
    inv = torch.tensor(448 / 9.0)
    got = fused.bias_act_quant(y, bias, activation, inv)
    ref = ops.quantize_input(GELUS[activation](y + bias), inv)
    d = steps_apart(got, ref).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (activation, (d > 0).float().mean())


def test_qkv_biases_in_the_attentions_dtype():
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(154, 768, generator=g) for _ in range(3)]
    biases = tuple(torch.randn(768, generator=g) for _ in range(3))
    for dtype in (torch.float16, torch.float32):
        outs = fused.qkv_bias(*(t.clone() for t in qkv), biases, dtype)
        for o, t, b in zip(outs, qkv, biases):
            assert o.dtype == dtype and torch.equal(o, (t + b).to(dtype))


def test_fusable_names_what_stops_fusion():
    enc = importlib.import_module("quant.fp8_encoder")
    lin = torch.nn.Linear(8, 8)
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(layer.self_attn, n, ops.FP8Linear.from_linear(lin, 0.01, 0.02, 1 / 0.02))
    layer.mlp = enc._MLP(GELUS["quick_gelu"])
    layer.mlp.fc1 = ops.FP8Linear.from_linear(lin, 0.01, 0.02, 1 / 0.02)
    layer.mlp.fc2 = enc.kept_linear(lin)
    assert fused.fusable([layer]) == (False, "layer 0 has matmuls kept in high precision")
    layer.mlp.fc2 = ops.FP8Linear.from_linear(lin, 0.01, 0.02, 1 / 0.02)
    assert fused.fusable([layer]) == (True, "")
    layer.self_attn.k_proj = ops.FP8Linear.from_linear(lin, 0.01, 0.03, 1 / 0.03)
    assert fused.fusable([layer]) == (False, "layer 0: q, k and v have different input scales")
    layer.self_attn.k_proj = layer.self_attn.q_proj
    layer.mlp = enc._MLP(torch.relu)
    layer.mlp.fc1 = layer.mlp.fc2 = layer.self_attn.q_proj
    assert fused.fusable([layer]) == (False, "layer 0: unknown MLP activation")


@pytest.mark.parametrize("masking", ["causal", "causal + padding"])
def test_attention_kernel_matches_sdpa_then_quantize(masking):
    """CLIP text's attention (77 tokens, 12 heads of 64): biases, softmax and out_proj's quantization in one
    kernel, against PyTorch's SDPA on the same fp32 inputs."""
    g = torch.Generator().manual_seed(4)
    b, t, heads, width = 2, 77, 12, 768
    q, k, v = (torch.randn(b * t, width, generator=g) * 2 for _ in range(3))
    biases = tuple(torch.randn(width, generator=g) for _ in range(3))
    mask = torch.full((t, t), -torch.finfo(torch.float32).max).triu_(1)
    if masking != "causal":  # ComfyUI's [B, 1, T, T] form: the second prompt has 20 real tokens
        keep = torch.ones(b, t)
        keep[1, 20:] = 0
        pad = (1.0 - keep[:, None, None, :]).expand(b, 1, t, t) * -torch.finfo(torch.float32).max
        mask = mask + pad
    inv = torch.tensor(448 / 4.0)
    got = fused.attention_quant(q, k, v, biases, (b, t, width), heads, mask, inv)
    qh, kh, vh = ((z + bias).view(b, t, heads, -1).transpose(1, 2) for z, bias in zip((q, k, v), biases))
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    ref = ops.quantize_input(o.transpose(1, 2).reshape(b * t, width), inv)
    d = steps_apart(got, ref).abs()
    assert got.shape == ref.shape and d.max() <= 1 and (d > 0).float().mean() < 1e-3, (d > 0).float().mean()
