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
                                 2.0 ** -6 - 2.0 ** -12, 464.0, 15.5, 17.0, float("inf"), -float("inf")])])
    for inv in (1.0, 0.37, 448 / 7.3):
        inv_t = torch.tensor(inv, dtype=torch.float32)
        got = fused.quantize(x[None], inv_t)
        assert torch.equal(codes(got), codes(ops.quantize_input(x[None], inv_t))), inv
    # NaN (an fp16 overflow upstream) stays NaN, as in the unfused path, instead of becoming finite codes
    nan = fused.quantize(torch.tensor([[float("nan"), 1.0]]), torch.tensor(1.0))
    assert torch.isnan(nan.float()[0, 0]) and nan.float()[0, 1] == 1.0
    assert torch.isnan(ops.quantize_input(torch.tensor([[float("nan")]]), torch.tensor(1.0)).float()).all()


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


def small_fp8_layers(width: int = 64, heads: int = 4, ffn: int = 128, n: int = 2, seed: int = 5):
    """FP8 encoder layers as fp8_encoder.build_layers makes them, at a size Triton's interpreter runs quickly."""
    enc = importlib.import_module("quant.fp8_encoder")
    g = torch.Generator().manual_seed(seed)

    def fp8(i: int, o: int) -> torch.nn.Module:
        lin = torch.nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.normal_(std=i ** -0.5, generator=g)
            lin.bias.normal_(std=0.1, generator=g)
            w_amax = float(lin.weight.abs().max())
        amax = 4.0  # the inputs' calibrated range
        return ops.FP8Linear.from_linear(lin, w_amax / 448, amax / 448, 448 / amax)

    layers = torch.nn.ModuleList()
    for _ in range(n):
        layer = enc._Layer()
        layer.layer_norm1, layer.layer_norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        layer.self_attn = enc._Attention(heads)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(layer.self_attn, name, fp8(width, width))
        layer.self_attn.k_proj.input_scale_inv = layer.self_attn.q_proj.input_scale_inv  # one shared scale
        layer.mlp = enc._MLP(GELUS["quick_gelu"])
        layer.mlp.fc1, layer.mlp.fc2 = fp8(width, ffn), fp8(ffn, width)
        layers.append(layer.requires_grad_(False))
    assert fused.fusable(layers) == (True, "")
    return layers


# Heads of 24 dimensions take the host's attention, as sequences over 128 tokens (vision) do.
@pytest.mark.parametrize("width, heads, act_dtype", [(64, 4, torch.float32), (48, 2, torch.float16)],
                         ids=["own attention (text)", "host attention (vision)"])
def test_a_capture_gives_the_kernels_only_buffers_made_before_it(monkeypatch, width, heads, act_dtype):
    """Under cudaMallocAsync, ComfyUI's default allocator, memory allocated during a CUDA-graph capture has no
    address yet and Triton's launcher refuses it ("Pointer argument cannot be accessed from Triton": the
    quantize node failed on an H100). So while a graph is captured, every tensor a kernel is given must be a
    weight or a buffer the warm-up made (fp8_fused.Workspace), and the numbers must not change."""
    layers = small_fp8_layers(width, heads)
    tokens = 9
    assert fused.own_attention(tokens, width, heads) == (width == 64)
    allowed = {t.untyped_storage().data_ptr() for t in [*layers.parameters(), *layers.buffers()]}
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, tokens, width, generator=g)
    mask = torch.full((tokens, tokens), -torch.finfo(torch.float32).max).triu_(1)
    with torch.no_grad():
        ref_last, ref_inter = fused.run_layers(x, layers, mask, 0, act_dtype)

        ws = fused.Workspace()
        fused.run_layers(x, layers, mask, 0, act_dtype, ws)  # the warm-up
        ws.sealed, ws.grown = True, False  # the capture
        given = []
        for name in ("_residual_ln_quant_kernel", "_bias_act_quant_kernel", "_quant_kernel", "_qkv_bias_kernel",
                     "_attention_quant_kernel"):
            kernel = getattr(fused, name)
            monkeypatch.setattr(fused, name, _Recording(kernel, name, given))
        last, inter = fused.run_layers(x.clone(), layers, mask.clone(), 0, act_dtype, ws)
    assert torch.equal(last, ref_last) and torch.equal(inter, ref_inter)
    assert not ws.grown and given
    workspace = {b.untyped_storage().data_ptr() for b in ws._buffers.values()}
    strays = [(k, i) for k, i, t in given if t.untyped_storage().data_ptr() not in allowed | workspace]
    assert not strays, f"kernel arguments made during the capture: {strays}"
    # A smaller batch (one prompt after a pair) is captured in the same buffers; a larger one needs a warm-up.
    with torch.no_grad():
        fused.run_layers(x[:1].clone(), layers, mask, None, act_dtype, ws)
        assert not ws.grown
        with pytest.raises(RuntimeError, match="not made before the CUDA-graph capture"):
            fused.run_layers(torch.cat([x, x]), layers, mask, None, act_dtype, ws)


class _Recording:
    """A Triton kernel that notes the tensors it is launched with."""

    def __init__(self, kernel, name: str, given: list) -> None:
        self.kernel, self.name, self.given = kernel, name, given

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.given += [(self.name, i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_a_warm_up_that_runs_out_of_memory_drops_the_graphs_it_made_stale(monkeypatch):
    """A larger input than before grows the workspace in the warm-up before its graph is captured, and the graphs
    captured earlier hold the old buffers' addresses. When that warm-up ran out of memory after a buffer had grown,
    those graphs were kept, and the next encode of an earlier shape replayed them on freed memory (wrong
    embeddings, or another tensor overwritten). CUDA's capture is a stand-in here: the kernels run in Triton's
    interpreter."""
    import contextlib

    enc = importlib.import_module("quant.fp8_encoder")
    for name, value in {"Stream": lambda device=None: _Stream(), "current_stream": lambda d=None: _Stream(),
                        "stream": lambda s: contextlib.nullcontext(), "device": lambda d: contextlib.nullcontext(),
                        "CUDAGraph": object, "graph_pool_handle": lambda: (0, 0),
                        "graph": lambda g, pool=None, stream=None: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    layers = small_fp8_layers()

    class Runner(enc.FP8Runner):
        def encoder_layers(self):
            return layers

        def _core(self, x, mask, inter_idx, ln_inter):
            return self.run_layers(x, mask, inter_idx)

    r = Runner()
    r.fused = True
    mask = torch.full((9, 9), -torch.finfo(torch.float32).max).triu_(1)
    with torch.no_grad():
        r._graphs["one row"] = r._capture(r._core, torch.randn(1, 9, 64), mask, None, False)
        big = 4 * 9 * 3 * 64  # the q/k/v matmul output of 4 rows: asked for after the hidden states' buffer grew
        real_empty = torch.empty

        def empty(*shape, **kw):
            if shape and isinstance(shape[0], int) and shape[0] >= big:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return real_empty(*shape, **kw)

        monkeypatch.setattr(torch, "empty", empty)
        with pytest.raises(torch.OutOfMemoryError):
            r._capture(r._core, torch.randn(4, 9, 64), mask, None, False)
    assert r._workspace.grown and not r._graphs, "graphs reading replaced workspace buffers were kept"


class _Stream:
    def wait_stream(self, other) -> None:
        pass


@pytest.mark.parametrize("m,n,k", [(77, 80, 256), (20, 32, 2048), (200, 96, 256)])
def test_the_gpu_matmul_equals_fp64_on_the_same_fp8_operands(m, n, k):
    """The fused encoder's matmul on the GPU (quant/fp8_gemm.py: FP8 codes widened to fp16, fp32 accumulation),
    here in Triton's interpreter: rows and columns that do not fill a block, both K blocks, both tile sizes
    (16 x 32 rows and columns up to 160 rows, 32 x 64 above). Its precision on
    the H200 (2e-7 to 9e-7, vs 2e-4 to 8e-4 for cuBLAS's FP8 GEMM) is measured by
    bench/probe_gemm_accumulation.py."""
    gemm = importlib.import_module("quant.fp8_gemm")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02
    x[:, :3] *= 30  # outlier channels
    sa, sb = x.abs().max() / 448, w.abs().max() / 448
    a, wq = (x / sa).to(ops.FP8), (w / sb).to(ops.FP8)
    exact = (a.double() * sa.double()) @ (wq.double() * sb.double()).t()
    got = gemm.matmul(a, wq, sa, sb)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert float((got.double() - exact).abs().max() / exact.abs().max()) < 2e-6
    assert not gemm.exact_for(a, wq)  # on the CPU the fused encoder keeps torch._scaled_mm, exact there


def _fp8_operands(g, m, n, k):
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02
    x[:, :3] *= 30
    sa, sb = x.abs().max() / 448, w.abs().max() / 448
    return (x / sa).to(ops.FP8), (w / sb).to(ops.FP8), sa, sb


def test_q_k_and_v_in_one_launch_are_each_projection_with_its_own_scales():
    gemm = importlib.import_module("quant.fp8_gemm")
    g = torch.Generator().manual_seed(6)
    a, _, sa, _ = _fp8_operands(g, 77, 64, 256)
    lins = []
    for spread in (0.02, 0.5, 3.0):  # weight scales far apart: a mixed-up scale would show
        w = torch.randn(64, 256, generator=g) * spread
        sb = w.abs().max() / 448
        lins.append(ops.FP8Linear((w / sb).to(ops.FP8), float(sb), float(sa), torch.zeros(64)))
    got = gemm.matmul_projections(a, lins)
    assert got.shape == (3, 77, 64)
    for i, lin in enumerate(lins):
        exact = (a.double() * lin.input_scale.double()) @ (lin.weight.double() * lin.weight_scale.double()).t()
        assert float((got[i].double() - exact).abs().max() / exact.abs().max()) < 2e-6, i


@pytest.mark.parametrize("activation", list(GELUS))
def test_fc1_with_its_bias_activation_and_fc2s_quantizer_in_one_launch(activation):
    gemm = importlib.import_module("quant.fp8_gemm")
    g = torch.Generator().manual_seed(7)
    a, wq, sa, sb = _fp8_operands(g, 77, 96, 256)
    lin = ops.FP8Linear(wq, float(sb), float(sa), torch.randn(96, generator=g))
    inv = torch.tensor(448 / 4.0)
    got = gemm.matmul_act_quant(a, lin, activation, inv)
    exact = (a.double() * sa.double()) @ (wq.double() * sb.double()).t()
    ref = ops.quantize_input(GELUS[activation]((exact + lin.bias.double()).float()), inv)
    d = steps_apart(got, ref).abs()
    assert got.dtype == ops.FP8 and d.max() <= 1 and (d > 0).float().mean() < 2e-3, (d > 0).float().mean()


@pytest.mark.parametrize("width, heads", [(128, 4), (384, 8)], ids=["own attention (text)", "host attention"])
def test_the_fused_encoder_on_the_gpus_matmuls_gives_the_numbers_of_the_cpu_path(monkeypatch, width, heads):
    """On the GPU, up to fp8_gemm.MAX_ROWS rows, the fused encoder runs q, k and v in one launch and fc1 with its
    bias, GELU and fc2's quantizer (quant/fp8_gemm.py). Forced here on the CPU (Triton's interpreter), under a
    capture's workspace: the numbers of the CPU's scaled_mm path (which equals the Q->DQ model), and only
    weights and workspace buffers given to the matmul kernel."""
    gemm = importlib.import_module("quant.fp8_gemm")
    layers = small_fp8_layers(width=width, heads=heads, ffn=256)
    assert fused.own_attention(9, width, heads) == (width == 128)
    for layer in layers:  # fc2's quantizer its own: fc1's launch must take it, not fc1's
        layer.mlp.fc2.input_scale.fill_(1.5 / 448)
        layer.mlp.fc2.input_scale_inv.fill_(448 / 1.5)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 9, width, generator=g)
    mask = torch.full((9, 9), -torch.finfo(torch.float32).max).triu_(1)
    with torch.no_grad():
        ref_last, ref_inter = fused.run_layers(x, layers, mask, 0, torch.float32)
        monkeypatch.setattr(gemm, "exact_for", lambda codes, *weights: True)
        given = []
        monkeypatch.setattr(gemm, "_matmul_kernel", _Recording(gemm._matmul_kernel, "matmul", given))
        ws = fused.Workspace()
        fused.run_layers(x, layers, mask, 0, torch.float32, ws)  # the warm-up
        ws.sealed, ws.grown, given[:] = True, False, []
        last, inter = fused.run_layers(x.clone(), layers, mask.clone(), 0, torch.float32, ws)
    launches = [a for n, i, a in given if i == 0]  # the input codes of each launch
    assert len(launches) == 4 * len(layers)  # q/k/v, out_proj, fc1 + GELU + quantizer, fc2
    for got, ref in ((last, ref_last), (inter, ref_inter)):
        assert float(torch.nn.functional.cosine_similarity(got.flatten(0, 1), ref.flatten(0, 1)).min()) > 0.9999
    allowed = {t.untyped_storage().data_ptr() for t in [*layers.parameters(), *layers.buffers()]}
    workspace = {b.untyped_storage().data_ptr() for b in ws._buffers.values()}
    assert not [(k, i) for k, i, t in given if t.untyped_storage().data_ptr() not in allowed | workspace]


def test_the_gpu_matmul_takes_what_it_was_measured_on():
    """exact_for: CUDA tensors, up to MAX_ROWS rows, K a multiple of its block, contiguous; else cuBLAS."""
    gemm = importlib.import_module("quant.fp8_gemm")

    class Cuda:  # what exact_for reads of a CUDA tensor, without a GPU
        def __init__(self, m: int, k: int, contiguous: bool = True, cuda: bool = True):
            self.shape, self.is_cuda, self._c = (m, k), cuda, contiguous

        def is_contiguous(self) -> bool:
            return self._c

    w = Cuda(768, 768)
    assert gemm.exact_for(Cuda(gemm.MAX_ROWS, 768), w, w) == (gemm.triton is not None)
    assert not gemm.exact_for(Cuda(gemm.MAX_ROWS + 1, 768), w)  # vision batches: FP8 instructions
    assert not gemm.exact_for(Cuda(77, 700), w)  # K not a multiple of 128
    assert not gemm.exact_for(Cuda(77, 768, contiguous=False), w)
    assert not gemm.exact_for(Cuda(77, 768), Cuda(768, 768, contiguous=False))
    assert not gemm.exact_for(Cuda(77, 768, cuda=False), w)


def test_a_gpu_matmul_that_fails_to_build_leaves_cublas_and_the_other_fused_kernels(monkeypatch, caplog):
    """On a GPU Triton cannot build the matmul for, it is turned off for the process (named in the log) and
    cuBLAS runs in its place; the kernels between the matmuls stay fused, and the numbers are the CPU path's."""
    gemm = importlib.import_module("quant.fp8_gemm")
    layers = small_fp8_layers(width=128, heads=4, ffn=256)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref_last, _ = fused.run_layers(x, layers, None, None, torch.float32)

        class Broken:
            def __getitem__(self, grid):
                def launch(*a, **k):
                    raise RuntimeError("PTX assembly failed (simulated)")
                return launch

        monkeypatch.setattr(gemm, "_disabled", "")
        monkeypatch.setattr(gemm, "exact_for", lambda codes, *weights: not gemm._disabled)  # as on a GPU
        monkeypatch.setattr(gemm, "_matmul_kernel", Broken())
        given = []
        monkeypatch.setattr(fused, "_residual_ln_quant_kernel",
                            _Recording(fused._residual_ln_quant_kernel, "ln", given))
        last, _ = fused.run_layers(x, layers, None, None, torch.float32)
    assert torch.equal(last, ref_last) and given  # cuBLAS's numbers, fused kernels around them
    assert "PTX assembly failed (simulated)" in gemm._disabled and "cuBLAS's FP8 GEMM runs instead" in caplog.text
