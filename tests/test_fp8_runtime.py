"""The FP8 runtime: FP8 weights in memory, same numbers as the calibrated Q->DQ model, safe fallbacks.

On this CPU machine the FP8 matmul path (`torch._scaled_mm`) runs too (exactly, slowly), so both kernels are
checked here; the GPU speed is measured by bench/ on an H100/H200.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import call, cosine, encode
from test_quantize_clip import quantize

PROMPTS = ("a photo of a dog running on the beach",
           "(masterpiece:1.3), a phoenix rising from flames, (vivid colors:1.2)",
           ", ".join(f"detail {i}" for i in range(50)))


def mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.quant.{name}")


@pytest.fixture(scope="module")
def clip(comfy):
    return call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")[0]


CALIBRATION = "\n".join(importlib.import_module("quant.prompts").CALIBRATION_PROMPTS[::5])  # 13 varied prompts


@pytest.fixture(scope="module")
def fake(comfy, clip):
    return quantize(comfy, clip, runtime="fake-quant", calibration_prompts=CALIBRATION)["result"][0]


@pytest.fixture(scope="module")
def fp8(comfy, clip, fake):
    # auto: on this CPU, dequantized per matmul. After `fake`, only the runtime changes: the node reuses its
    # calibration (the same model as a new one, tested in test_quantize_clip.py) instead of calibrating again.
    out = quantize(comfy, clip, calibration_prompts=CALIBRATION)
    return out["result"][0], out["result"][1]


def tower(pack, c):
    (m, rec), = mod(pack, "artifact").quantized_towers(c).values()
    return m


def test_fp8_weights_in_memory_and_reported_size(pack, clip, fp8):
    qclip, report = fp8
    m = tower(pack, qclip)
    linears = [x for x in m.modules() if isinstance(x, mod(pack, "fp8_ops").FP8Linear)]
    assert len(linears) == 72 and all(x.weight.dtype == torch.float8_e4m3fn for x in linears)
    emb = m.get_input_embeddings()
    assert emb.weight.dtype == torch.float8_e4m3fn
    # no high-precision copy of a quantized weight is kept
    assert not any(p.dtype in (torch.float16, torch.float32) and p.numel() >= 768 * 768
                   for n, p in m.named_parameters() if "text_projection" not in n)
    ratio = qclip.patcher.model_size() / clip.patcher.model_size()
    assert ratio <= 0.55, ratio
    assert "Runtime: fp8 (FP8 weights, dequantized per matmul: cpu has no FP8 tensor cores)" in report
    assert "matches the calibrated Q->DQ model: worst conditioning cosine" in report


def test_a_token_table_kept_in_high_precision_keeps_the_checkpoints_dtype(comfy, pack, clip):
    """With 'fp8_token_embedding' off the table stays as ComfyUI loaded it. It used to stay in the calibration
    copy's fp32: twice its memory (CLIP-L 152 instead of 76 MB), for the same numbers."""
    fake = quantize(comfy, clip, runtime="fake-quant", calibration_prompts=CALIBRATION,
                    fp8_token_embedding=False)["result"][0]
    with torch.inference_mode():
        qclip, _ = mod(pack, "runtime").to_fp8_runtime(fake, "auto")
    (path, _), = mod(pack, "artifact").quantized_towers(qclip).items()
    loaded = clip.patcher.get_model_object(path).text_model.embeddings.token_embedding.weight
    table = tower(pack, qclip).get_input_embeddings().weight
    assert loaded.dtype == torch.float16 and table.dtype == loaded.dtype and torch.equal(table, loaded)
    ratio = qclip.patcher.model_size() / clip.patcher.model_size()
    assert ratio <= 0.55 + table.numel() * 2 / clip.patcher.model_size(), ratio  # FP8 layers, fp16 table
    for p in PROMPTS[1:]:
        got, want = encode(comfy, qclip, p), encode(comfy, fake, p)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_fp8_token_table_is_the_q_dq_table_bit_for_bit_whatever_the_devices_division(comfy, pack, clip,
                                                                                        monkeypatch):
    """The FP8 runtime's token table holds the calibrated Q->DQ table's values exactly, also where its per-row
    scales cannot be derived again from that table. A GPU divides by a constant as a multiply by its reciprocal:
    on an H200, converting a CLIP calibrated there gave 22,710 of CLIP-L's 49,408 row scales an ulp off, and
    the conditioning moved by up to 0.18 from one conversion to the next (bench/probe_memo_rebuild.py). The
    GPU's division is emulated here for the calibration."""
    div = torch.Tensor.__truediv__

    def gpu_div(a, b):  # what CUDA computes for tensor / python scalar
        return a * (1.0 / b) if isinstance(b, (int, float)) else div(a, b)

    with monkeypatch.context() as m, torch.inference_mode():
        m.setattr(torch.Tensor, "__truediv__", gpu_div)
        fake, _ = mod(pack, "calibrate").quantize_clip(clip, ["a cat", "(a red car:1.2)"], held_out=["a dog"])
    with torch.inference_mode():
        qclip, _ = mod(pack, "runtime").to_fp8_runtime(fake, "auto")
    want = tower(pack, fake).get_input_embeddings().weight
    got = tower(pack, qclip).get_input_embeddings()
    assert torch.equal(got.weight.float() * got.weight_scale.unsqueeze(1), want)
    for p in PROMPTS[:2]:
        (rc, rp), (gc, gp) = encode(comfy, fake, p), encode(comfy, qclip, p)
        assert torch.equal(rc, gc) and torch.equal(rp, gp), (p, cosine(rc, gc))


def test_token_table_row_scales_do_not_depend_on_the_devices_division(pack, monkeypatch):
    """A remembered calibration is rebuilt on the GPU, a first one in RAM: the token table's per-row scales must
    not depend on how the device divides (on an H200 the rebuilt SD1.5 CLIP differed from the first by up to
    0.18 in its conditioning, bench/probe_memo_rebuild.py)."""
    w = torch.randn(4096, 768, generator=torch.Generator().manual_seed(5)) * 0.02
    want = mod(pack, "fp8_ops").row_scales(w)
    div = torch.Tensor.__truediv__
    monkeypatch.setattr(torch.Tensor, "__truediv__",  # what CUDA computes for tensor / python scalar
                        lambda a, b: a * (1.0 / b) if isinstance(b, (int, float)) else div(a, b))
    assert (w.abs().amax(dim=1, keepdim=True) / 448.0 != want).any()  # the emulation does change a scalar division
    assert torch.equal(mod(pack, "fp8_ops").row_scales(w), want)


def test_a_clip_loaded_in_fp32_keeps_its_high_precision_parts_in_fp32(comfy, pack, scratch):
    """--fp32-text-enc (or a loader's dtype): the kept layers (text_projection by default) and a token table not
    in FP8 stay in fp32, the values the Q->DQ model computed with. Kept layers were rounded to fp16 (the
    pooled output then differed), and a save from the fake-quant preview wrote the table in fp32 while a save
    from the FP8 runtime wrote it in fp16: two files for one model."""
    sd = importlib.import_module("comfy.sd")
    path = comfy.folder_paths.get_full_path("text_encoders", comfy.files["clip_l"])
    clip = sd.load_clip(ckpt_paths=[path], clip_type=sd.CLIPType.STABLE_DIFFUSION, model_options={"dtype": torch.float32})
    proj = clip.cond_stage_model.clip_l.transformer.text_projection.weight
    assert proj.dtype == torch.float32
    with torch.no_grad():  # an fp32 checkpoint: values fp16 cannot hold
        proj += 1e-4 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(7))
    recipe = mod(pack, "recipe").Recipe(fp8_embedding=False)
    with torch.inference_mode():
        fake, _ = mod(pack, "calibrate").quantize_clip(clip, ["a cat", "(a red car:1.2)"], recipe,
                                                       held_out=["a dog"])
        qclip, _ = mod(pack, "runtime").to_fp8_runtime(fake, "auto")
    m = tower(pack, qclip)
    assert m.text_projection.weight.dtype == torch.float32 and torch.equal(m.text_projection.weight, proj)
    assert m.get_input_embeddings().weight.dtype == torch.float32
    for p in PROMPTS[:2]:
        (rc, rp), (gc, gp) = encode(comfy, fake, p), encode(comfy, qclip, p)
        assert torch.equal(rc, gc) and torch.equal(rp, gp), (p, cosine(rp, gp))
    te = comfy.folder_paths.get_folder_paths("text_encoders")[0]
    files = []
    for name, c in (("fp32_from_fake", fake), ("fp32_from_fp8", qclip)):
        scratch(f"{te}/fp8test/{name}.safetensors")
        call(comfy, "FP8CLIPSave", clip=c, filename=f"fp8test/{name}", format="fp8 + scales (Load FP8 CLIP)",
             overwrite=True)
        files.append(load_file(f"{te}/fp8test/{name}.safetensors"))
    a, b = files
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    assert a["text_projection.weight"].dtype == torch.float32


def test_proxy_state_dict_is_the_original_towers(comfy, pack, fp8):
    """ComfyUI sizes (v0.29 dynamic VRAM: every encode), backs up and saves the quantized CLIP's tower through
    the proxy's state_dict: it must be exactly the original tower's, read at call time."""
    import comfy.utils

    proxy_mod = mod(pack, "proxy")
    proxy = fp8[0].patcher.object_patches["clip_l.transformer"]
    original = proxy_mod.original_of(proxy)
    want, got = original.state_dict(), proxy.state_dict()
    assert len(got) == 197 and list(got) == list(want)
    assert all(got[k].data_ptr() == want[k].data_ptr() and not got[k].requires_grad for k in want)
    assert got._metadata == want._metadata
    dest: dict = {}
    assert proxy.state_dict(destination=dest, prefix="clip_l.transformer.") is dest
    assert list(dest) == ["clip_l.transformer." + k for k in want]
    assert all(isinstance(v, torch.nn.Parameter) for v in proxy.state_dict(keep_vars=True).values())
    key = "text_model.encoder.layers.3.mlp.fc1.weight"
    old = comfy.utils.set_attr_param(original, key, want[key].clone())  # as ComfyUI writes weights by name
    try:
        assert proxy.state_dict()[key].data_ptr() != want[key].data_ptr()
        assert torch.equal(proxy.state_dict()[key], want[key])
    finally:
        comfy.utils.set_attr_param(original, key, old)
    hooked = torch.nn.Sequential(torch.nn.Linear(2, 2))
    hooked[0]._register_state_dict_hook(lambda *a: None)
    assert proxy_mod._state_dict_entries(hooked) is None  # torch's own walk then


def test_a_tower_sent_back_gets_its_host_tensors_back_instead_of_a_copy(pack, fp8):
    """Another quantized model running sends a tower back to the offload device (unCLIP: a CLIP and a CLIP
    vision in turn). The tower never changes once quantized, so the host tensors it had before going to the GPU
    come back, with no device-to-host copy (on an H100 that copy was 24-56 ms of each switch). Here the "GPU" is
    the meta device, which cannot be copied from: only the kept host tensors can come back."""
    proxy_mod = mod(pack, "proxy")
    impl = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    impl[0].register_buffer("input_scale", torch.tensor(0.5))
    host = [t.data_ptr() for t in [*impl.parameters(), *impl.buffers()]]
    t = proxy_mod.TowerProxy(impl, torch.nn.Linear(4, 4), load_device="meta", offload_device="cpu")
    # A tower still calibrating changes on the GPU (its scales, then its folded weights): no host copy of it.
    moved: list = []
    impl.to = lambda device, **kw: moved.append(torch.device(device))
    t.place(t.load_device)
    assert moved == [torch.device("meta")] and proxy_mod._HOST not in impl.__dict__
    t.offload_now()
    del impl.to
    mod(pack, "artifact").attach(impl, SimpleNamespace(tower="test"))  # calibrated: it no longer changes
    for _ in range(2):
        t.place(t.load_device)
        assert all(x.is_meta for x in [*impl.parameters(), *impl.buffers()])
        t.offload_now()
        assert [x.data_ptr() for x in [*impl.parameters(), *impl.buffers()]] == host
        assert all(x.device.type == "cpu" for x in [*impl.parameters(), *impl.buffers()])
    assert float(impl[0].input_scale) == 0.5
    # A tower whose structure changed while on the GPU goes back the ordinary way, and the copy is released.
    t.place(t.load_device)
    kept = impl.__dict__[proxy_mod._HOST]
    impl[1] = torch.nn.LayerNorm(4, device="meta")
    assert not kept.restore(impl) and impl[0].weight.is_meta  # refused, nothing put back
    moved: list = []
    impl.to = lambda device, **kw: moved.append(torch.device(device))  # meta cannot really be copied back
    t.offload_now()
    assert moved == [torch.device("cpu")]
    assert proxy_mod._HOST not in impl.__dict__ and not kept._finalizer.alive
    # the real FP8 tower: every tensor is held (the FP8 weights, scales, embeddings)
    real = proxy_mod.unwrap(fp8[0].patcher.object_patches["clip_l.transformer"])
    copy_ = proxy_mod.HostCopy(real)
    assert copy_.holds(real) and len(copy_.tensors) == len([*real.parameters(), *real.buffers()])
    copy_.release()



def test_a_tower_moved_outside_inference_mode_keeps_inference_tensors(pack):
    """The towers are made inside ComfyUI's executor (inference mode); its /free ("Unload Models") moves them
    outside it. Moved as normal tensors, the FP8 token table then failed the next encode's lookup with
    "Inference tensors do not track version counter" (ComfyUI v0.29 server, H100, bench/probe_http_server.py).
    Here the "GPU" is the meta device."""
    proxy_mod = mod(pack, "proxy")
    with torch.inference_mode():
        impl = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    t = proxy_mod.TowerProxy(impl, torch.nn.Linear(4, 4), load_device="meta", offload_device="cpu")
    t.place(t.load_device)  # outside inference mode
    assert all(x.is_meta and x.is_inference() for x in impl.parameters())
    with torch.inference_mode():
        idx = torch.tensor([0, 2])
        assert impl[0].bias[idx.to("meta")].shape == (2,)  # the lookup that failed

def test_comfyui_makes_room_before_a_tower_goes_to_the_gpu(comfy, pack, fp8, monkeypatch):
    """ComfyUI frees GPU memory only for what its loader places; the towers (the FP8 ones, and the fp32 copy
    that calibration runs) go to the GPU behind their proxies. On a small card they met ComfyUI's models: SDXL on
    an emulated 8 GB card failed with CUDA out of memory when the node was added to a workflow that had run
    (bench/results/small_vram_h100.md). So a tower's move to the GPU first asks ComfyUI to free its size plus
    ComfyUI's own inference reserve, never unloading the CLIP that runs it. Here the "GPU" is the meta device."""
    import comfy.model_management as mm

    vram, proxy_mod = mod(pack, "vram"), mod(pack, "proxy")
    impl = proxy_mod.unwrap(fp8[0].patcher.object_patches["clip_l.transformer"])
    proxy = proxy_mod.TowerProxy(impl, torch.nn.Linear(2, 2), load_device="meta", offload_device="cpu")
    running = fp8[0].clone()
    running.patcher.add_object_patch("clip_l.transformer", proxy)
    running.load_model()  # ComfyUI's load: now in its loaded models
    asked: list = []
    monkeypatch.setattr(proxy_mod, "make_room", lambda n, device, keep: asked.append((n, device, list(keep))))
    try:
        proxy.place(proxy.load_device)
        proxy.place(proxy.load_device)  # already there: nothing asked
    finally:
        proxy.offload_now()
    size = sum(t.nbytes for t in (*impl.parameters(), *impl.buffers()))
    assert 100 * 2 ** 20 < size < 130 * 2 ** 20  # the FP8 CLIP-L tower
    assert asked == [(size, torch.device("meta"), [running.patcher])]
    assert all(t.device.type == "cpu" for t in impl.parameters())

    freed: list = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(): freed.append((need, device, keep_loaded)))
    vram.make_room(size, "cuda:0", [running.patcher])
    vram.make_room(size, "cpu", [running.patcher])  # ComfyUI on the CPU: nothing to free
    (need, device, keep_loaded), = freed
    assert need == size + mm.minimum_inference_memory() and device == torch.device("cuda:0")
    assert [lm.model for lm in keep_loaded] == [running.patcher]


def test_fp8_matches_fake_quant_with_both_kernels(comfy, pack, fake, fp8):
    qclip = fp8[0]
    m = tower(pack, qclip)
    for matmul in ("dequant", "scaled_mm"):
        m.configure(lambda d, mm=matmul: type("P", (), {"matmul": mm, "executor": "eager", "act_dtype": "float32"}))
        for p in PROMPTS:
            (rc, rp), (gc, gp) = encode(comfy, fake, p), encode(comfy, qclip, p)
            assert rc.shape == gc.shape
            # The same FP8 codes, the same scales to the ulp (ModelOpt's 448/amax included), the same fp32
            # arithmetic on this CPU: the same numbers, not just close ones.
            assert torch.equal(rc, gc) and torch.equal(rp, gp), (matmul, p, cosine(rc, gc))
        # FP8 matmuls: q, k and v quantize their common input once (same codes, so still equal above)
        assert all(a.shared_input == (matmul == "scaled_mm") for a in m.modules() if hasattr(a, "shared_input"))
    assert any(getattr(x, "mode", None) == "scaled_mm" for x in m.modules())
    m.configure(lambda d: mod(pack, "runtime").plan("auto", d))


def test_gpu_without_fp8_tensor_cores_falls_back_and_says_why(pack, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3090")
    p = mod(pack, "runtime").plan("auto", torch.device("cuda", 0))
    assert (p.runtime, p.matmul) == ("fp8", "dequant")
    assert "compute capability 8.6; FP8 matmuls need 8.9+" in p.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert mod(pack, "runtime").plan("auto", torch.device("cuda", 0)).matmul == "scaled_mm"
    # ROCm reports the gfx generation (gfx1100: 11.0) where CUDA reports the compute capability
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (11, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "AMD Radeon RX 7900 XTX")
    p = mod(pack, "runtime").plan("auto", torch.device("cuda", 0))
    assert (p.runtime, p.matmul) == ("fp8", "dequant") and "AMD GPU (ROCm)" in p.reason


def test_comfyui_cuda_malloc_allocator_keeps_the_fused_kernels_and_compiled_code_out_of_graphs(pack, monkeypatch):
    """ComfyUI's main.py switches PyTorch to cudaMallocAsync on NVIDIA GPUs; Triton kernels given memory allocated
    during a CUDA-graph capture failed there in the quantize node and later aborted the server (H100,
    bench/probe_http_server.py). The fused kernels are given only buffers made before the capture
    (test_fused_kernels.py), so they keep their graphs there; torch.compile's code runs without graphs."""
    runtime = mod(pack, "runtime")
    if not mod(pack, "fp8_fused").available()[0]:
        pytest.skip("no Triton here: the plan is unfused anyway")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    for allocator in ("native", "cudaMallocAsync"):
        monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda a=allocator: a)
        p = runtime.plan("auto", gpu)
        assert (p.matmul, p.executor, p.kernels, p.graphs) == ("scaled_mm", "cuda_graph", "fused", True), allocator
    c = runtime.plan("fp8-compiled", gpu)
    assert (c.executor, c.graphs) == ("compiled", False) and "no CUDA graphs" in c.reason
    assert "cudaMallocAsync" in c.reason and "--disable-cuda-malloc" in c.reason
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert runtime.plan("fp8-compiled", gpu).graphs


@pytest.mark.parametrize("intermediate", [None, 10], ids=["last layer", "intermediate layer"])
def test_tensors_made_during_a_cuda_graph_capture_die_inside_it(pack, monkeypatch, intermediate):
    """With cudaMallocAsync (ComfyUI's default), freeing a tensor allocated during a capture after the capture
    ended aborted the process: every FP8 CLIP vision encode died so on an H200 (its intermediate-layer output
    was left in a loop variable; bench/probe_capture_async.py). Here CUDA's capture is a stand-in that records
    which tensors the captured run made and checks, as the capture ends, that none of them is still alive."""
    import contextlib
    import weakref

    made: list = []
    alive_at_end: list = []

    class Capture:
        def __init__(self, graph, pool=None, stream=None):
            pass

        def __enter__(self):
            made.clear()

        def __exit__(self, *exc):
            alive_at_end.extend(r for r in made if r() is not None)

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    for name, value in {"Stream": Stream, "current_stream": lambda d=None: Stream(),
                        "stream": lambda s: contextlib.nullcontext(), "device": lambda d: contextlib.nullcontext(),
                        "CUDAGraph": lambda: object(), "graph_pool_handle": lambda: (0, 0),
                        "graph": Capture}.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def core(x, mask, inter_idx, ln_inter):
        last = x * 2
        inter = None if inter_idx is None else x + 1
        made.extend(weakref.ref(t) for t in (last, inter) if t is not None)
        return last, inter

    runner = mod(pack, "fp8_encoder").FP8Runner()
    graph, sx, smask, out = runner._capture(core, torch.ones(2, 3), None, intermediate, True)
    assert made and not alive_at_end, f"{len(alive_at_end)} tensors from the captured run outlived the capture"
    assert torch.equal(out[0], torch.full((2, 3), 2.0))
    assert (out[1] is None) == (intermediate is None)


def test_model_moved_to_another_device_replans(comfy, pack, fp8):
    """Calibrated (and planned) for one device, run on another: the plan follows the device."""
    qclip = fp8[0]
    m = tower(pack, qclip)
    asked = []

    def planner(d):
        asked.append(d.type)
        return type("P", (), {"matmul": "scaled_mm" if d.type == "cuda" else "dequant",
                              "executor": "cuda_graph" if d.type == "cuda" else "eager",
                              "act_dtype": "float16" if d.type == "cuda" else "float32"})
    try:
        m.configure(planner)
        m._device = torch.device("cuda", 0)  # as if it had last run on a GPU, with float16 activations
        m.act_dtype = torch.float16
        asked.clear()
        out = encode(comfy, qclip, PROMPTS[0])[0]
        assert asked == ["cpu"] and m._device == torch.device("cpu") and m.act_dtype == torch.float32
    finally:
        m.configure(lambda d: mod(pack, "runtime").plan("auto", d))
    assert torch.equal(out, encode(comfy, qclip, PROMPTS[0])[0])  # the CPU's own plan, bit for bit


def test_out_of_memory_during_conversion_leaves_nothing_half_converted(comfy, pack, fake, monkeypatch):
    ops = mod(pack, "fp8_ops")
    calls = {"n": 0}
    orig = ops.FP8Linear.from_linear.__func__

    def failing(cls, *a, **k):
        calls["n"] += 1
        if calls["n"] == 30:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(cls, *a, **k)

    monkeypatch.setattr(ops.FP8Linear, "from_linear", classmethod(failing))
    before = dict(fake.patcher.object_patches)
    ref = encode(comfy, fake, PROMPTS[0])[0]
    with pytest.raises(torch.OutOfMemoryError):
        mod(pack, "runtime").to_fp8_runtime(fake, "auto")
    assert dict(fake.patcher.object_patches) == before
    assert torch.equal(encode(comfy, fake, PROMPTS[0])[0], ref)


def test_fp8_clip_does_not_keep_the_calibration_copy_alive(comfy, pack, clip):
    """The fp32 Q->DQ copy used for calibration is freed once the FP8 CLIP exists (RAM, not a cache)."""
    import gc
    import weakref

    fake = quantize(comfy, clip, runtime="fake-quant", calibration_prompts="a cat",
                    evaluation_prompts="a dog")["result"][0]
    fake_tower = weakref.ref(tower(pack, fake))
    fp8, _ = mod(pack, "runtime").to_fp8_runtime(fake, "auto")
    encode(comfy, fp8, PROMPTS[0])
    del fake
    gc.collect()
    assert fake_tower() is None
    assert encode(comfy, fp8, PROMPTS[0])[0].shape == (1, 77, 768)


def test_the_nodes_check_lets_go_of_the_calibration_copy_before_the_fp8_model_runs(comfy, pack, clip, monkeypatch):
    """The quantize nodes check the FP8 model against the Q->DQ one, which they do not use again. Its fp32 copy
    stayed resident until the FP8 tower's first run sent it back to the CPU, just before it was freed: 1.8 s for
    a ViT-H on an H200 (bench/results/http_server_gpu.md). Now it is let go once its outputs are taken."""
    import gc
    import weakref

    runtime = mod(pack, "runtime")
    fake = quantize(comfy, clip, runtime="fake-quant", calibration_prompts="a cat",
                    evaluation_prompts="a dog")["result"][0]
    fp8, _ = runtime.to_fp8_runtime(fake, "auto")
    copy_ = weakref.ref(tower(pack, fake))
    kept = runtime.verify(fake, fp8, list(PROMPTS[:2]))
    assert copy_() is not None  # without drop_reference the caller may use the Q->DQ model again
    real_encode, alive_when_fp8_ran = mod(pack, "calibrate").encode, []

    def spy(c, p):
        if c is fp8:
            gc.collect()
            alive_when_fp8_ran.append(copy_() is not None)
        return real_encode(c, p)
    with monkeypatch.context() as m:
        m.setattr(mod(pack, "calibrate"), "encode", spy)
        dropped = runtime.verify(fake, fp8, list(PROMPTS[:2]), drop_reference=True)
    assert dropped == kept and alive_when_fp8_ran == [False, False]
    assert mod(pack, "artifact").quantized_towers(fake) == {}  # the clone no longer claims a quantized tower


def test_fused_kernels_give_the_numbers_of_the_unfused_path(comfy, pack, fake, fp8, monkeypatch):
    """What GPUs with FP8 tensor cores run by default: the work between the FP8 matmuls in Triton kernels
    (here in Triton's CPU interpreter), against the Q->DQ model, which the unfused path equals on this CPU.
    Reductions and exp round differently in the last bit, so a few FP8 codes may land one step over."""
    # The interpreter's time goes by programs: elementwise passes and attention in a few large ones (their
    # numbers do not depend on it; the GPU's launch sizes are tested in test_fused_kernels.py): 79 -> 13 s here.
    fused = mod(pack, "fp8_fused")
    monkeypatch.setattr(fused, "_ELEMENTWISE_BLOCK", 1 << 16)
    monkeypatch.setattr(fused, "ATTENTION_BLOCK_M", 128)
    qclip = fp8[0]
    m = tower(pack, qclip)
    plan = mod(pack, "runtime").Plan("fp8", "scaled_mm", "eager", "float32", "test", kernels="fused")
    m.configure(lambda d: plan)
    try:
        # One encode of one row (the interpreter takes over a minute per row; several rows at a small size:
        # test_fused_kernels.py), with clip skip, so a layer's output goes through the final LayerNorm as an
        # intermediate one.
        (f_skip,) = call(comfy, "CLIPSetLastLayer", clip=fake, stop_at_clip_layer=-2)
        (q_skip,) = call(comfy, "CLIPSetLastLayer", clip=qclip, stop_at_clip_layer=-2)
        text = "a lighthouse on a cliff at dusk, oil painting, dramatic clouds"
        (rc, rp), (gc, gp) = encode(comfy, f_skip, text), encode(comfy, q_skip, text)
        assert m.fused and rc.shape == gc.shape == (1, 77, 768)
        assert cosine(rc, gc) >= 0.999 and cosine(rp, gp) >= 0.999, (cosine(rc, gc), cosine(rp, gp))
    finally:
        m.configure(lambda d: mod(pack, "runtime").plan("auto", d))


def test_fused_kernels_that_fail_to_build_fall_back_to_the_unfused_path(comfy, pack, fake, fp8, monkeypatch, caplog):
    """A Triton that cannot compile on the user's machine must not break the encode."""
    qclip = fp8[0]
    m = tower(pack, qclip)
    plan = mod(pack, "runtime").Plan("fp8", "scaled_mm", "eager", "float32", "test", kernels="fused")

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed (simulated)")

    monkeypatch.setattr(mod(pack, "fp8_fused"), "run_layers", broken)
    m.configure(lambda d: plan)
    try:
        out = encode(comfy, qclip, PROMPTS[0])[0]
        assert not m.fused and "PTX assembly failed (simulated)" in caplog.text
        assert torch.equal(out, encode(comfy, fake, PROMPTS[0])[0])  # the unfused path: the Q->DQ numbers
    finally:
        m.configure(lambda d: mod(pack, "runtime").plan("auto", d))


def test_all_hidden_states_get_the_final_layer_norm_when_comfyui_asks(pack, fp8):
    """intermediate_output="all" with final_layer_norm_intermediate, as ComfyUI's CLIPTextModel_ applies it to
    every stacked layer output (it was skipped)."""
    m = tower(pack, fp8[0])
    embeds = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = m(None, None, embeds=embeds, num_tokens=[77, 77], intermediate_output="all",
                  final_layer_norm_intermediate=False, dtype=torch.float32)[1]
        normed = m(None, None, embeds=embeds, num_tokens=[77, 77], intermediate_output="all",
                   final_layer_norm_intermediate=True, dtype=torch.float32)[1]
        assert plain.shape == normed.shape == (2, 12, 77, 768)
        assert torch.allclose(normed, m.text_model.final_layer_norm(plain), atol=1e-5)
        assert not torch.allclose(normed, plain, atol=1e-2)


def test_an_all_zero_layer_gets_modelopts_scale_not_nan(pack):
    """A Linear whose weights (or inputs) are all zero: ModelOpt's formula takes amax 1 and keeps zeros; 448/0
    gave NaN FP8 codes, NaN outputs and a saved file the loader refuses."""
    mb = mod(pack, "modelopt_bridge")
    q = SimpleNamespace(is_enabled=True, amax=torch.tensor(0.0))
    dequant, mult = mb._scales(q)
    assert (dequant, mult) == (pytest.approx(1 / 448), 448.0)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()
    fp8 = mod(pack, "fp8_ops").FP8Linear.from_linear(lin, dequant, dequant, mult)
    x = torch.randn(2, 4)
    assert torch.equal(fp8(x), lin.bias.detach().expand(2, 3))


def test_unload_models_frees_the_cuda_graphs_of_a_tower_that_stays_put(comfy, pack, fp8_clip):
    """With --gpu-only ComfyUI's offload device is the GPU: "Unload Models" leaves the FP8 tower where it is, and
    the memory its CUDA graphs hold (buffers per prompt shape) went only when the weights moved. (No CUDA here:
    a stand-in entry in the graph cache is what is checked.)"""
    import comfy.model_management as mm

    fp8 = fp8_clip[1]
    tower = mod(pack, "proxy").unwrap(fp8.patcher.get_model_object("clip_l.transformer"))
    encode(comfy, fp8, "a cat")  # loaded, as ComfyUI keeps it after an encode
    tower._graphs[("stand-in",)] = object()
    mm.unload_all_models()
    assert not tower._graphs
    encode(comfy, fp8, "a cat")  # and it encodes again
