"""TensorRT engines for the FP8 CLIP, for real up to execution.

What runs here: export, TensorRT for RTX's parser and builder (no GPU needed), the cache, the node in a real
ComfyUI, the fallback decisions. What cannot: executing an engine (TensorRT for RTX refuses compute capability
9.0, the GPUs this project has, and deserializing needs a GPU). Where a test needs the engine's output, the
node's runner is swapped for onnxruntime running the very ONNX graph the engine was built from; everything
around it (cache, key, engine module, clip skip, pooled output, projection, textual inversion) is the real code.
The engine's graph matches the PyTorch FP8 path to >= 0.999 (see test_tensorrt_export.py); through ComfyUI's
encode path the tests below ask for 0.999 for the conditioning and 0.998 for the pooled output (one token).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import call, cosine, encode, pack_module

PROMPT = "a photo of an astronaut riding a horse, detailed, 4k"


def tr(pack, name):
    return pack_module(pack, f"trt_runtime.{name}")


def tower(pack, clip):
    ((module, record),) = pack_module(pack, "quant.artifact").quantized_towers(clip).values()
    return module, record




@pytest.fixture(scope="module")
def fp8_engine(pack, fp8_clip, rtx):
    """A real FP8 engine for the full-size CLIP-L fixture (TensorRT for RTX, portable) and its progress trace."""
    ox, build = tr(pack, "onnx_export"), tr(pack, "build")
    seen = []
    result = build.build_engine(ox.export_text_transformer(*tower(pack, fp8_clip[1])), build.Profile(max_rows=8),
                                rtx.flavour, target=rtx.target, progress=lambda f, phase: seen.append(f))
    return result, seen


def test_real_engine_is_fp8_sized(pack, fp8_clip, rtx, fp8_engine):
    ox, build = tr(pack, "onnx_export"), tr(pack, "build")
    module, _ = tower(pack, fp8_clip[1])
    fp16 = build.build_engine(ox.export_text_transformer(module, None, fp8=False, compute_dtype=torch.float16),
                              build.Profile(max_rows=8), rtx.flavour, target=rtx.target)
    fp8 = fp8_engine[0]
    mb = 2 ** 20
    params = sum(lin.weight.numel() for lin in ox.spec_from_module(module, None).linears())
    print(f"\nengines: FP8 {len(fp8.engine) / mb:.1f} MB, FP16 {len(fp16.engine) / mb:.1f} MB; "
          f"{params / 1e6:.1f}M Linear weights ({params * 2 / mb:.0f} MB in fp16)")
    assert len(fp8.engine) < 0.65 * len(fp16.engine)
    assert len(fp8.engine) < 0.6 * params * 2  # well under the weights' fp16 bytes: they are stored in FP8
    assert params * 2 < len(fp16.engine) < params * 3  # the FP16 engine holds fp16 weights, not fp32: a fair match


def test_binding_plan_read_from_the_built_network(pack, fp8_engine):
    ox = tr(pack, "onnx_export")
    plan = fp8_engine[0].plan
    assert plan == ox.io_contract(768, 12)
    assert [(t.name, t.mode, t.dtype, t.shape) for t in plan] == [
        ("embeds", "input", "float32", (-1, 77, 768)), ("last_hidden", "output", "float32", (-1, 77, 768)),
        ("hidden_states", "output", "float32", (-1, 12, 77, 768))]
    bufs = tr(pack, "bindings").allocate_outputs(plan, 3, torch.device("cpu"))
    assert {k: tuple(v.shape) for k, v in bufs.items()} == {"last_hidden": (3, 77, 768),
                                                           "hidden_states": (3, 12, 77, 768)}


def test_engine_whose_io_differs_is_refused_with_the_difference_named(pack, fp8_engine):
    bindings, ox = tr(pack, "bindings"), tr(pack, "onnx_export")
    plan = fp8_engine[0].plan
    other = [ox.TensorIO(t.name, t.mode, "float16" if t.name == "last_hidden" else t.dtype, t.shape) for t in plan]
    with pytest.raises(bindings.EngineMismatchError, match=r"'last_hidden' is output float16.*expected output "
                                                           r"float32.*Delete the engine file"):
        bindings.check_plan(other, plan)
    with pytest.raises(bindings.EngineMismatchError, match="missing 'hidden_states'"):
        bindings.check_plan(plan[:2], plan)


def test_build_reports_progress_to_the_end(fp8_engine):
    seen = fp8_engine[1]
    assert len(seen) > 10 and seen[-1] == 1.0
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # never goes backwards in the UI


def test_interrupt_during_build_stops_it(pack, fp8_clip, rtx):
    import comfy.model_management as mm

    ox, build = tr(pack, "onnx_export"), tr(pack, "build")
    steps = []

    def cancel_after_3():
        steps.append(1)
        if len(steps) == 3:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    try:
        with pytest.raises(mm.InterruptProcessingException):
            build.build_engine(ox.export_text_transformer(*tower(pack, fp8_clip[1])), build.Profile(max_rows=2),
                               rtx.flavour, target=rtx.target, check_interrupt=cancel_after_3)
    finally:
        mm.interrupt_current_processing(False)
    assert len(steps) == 3


# --- when the engine can run, and when not ----------------------------------------------------------------

def _fake_gpu(monkeypatch, cc, name="NVIDIA Test GPU"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_availability_decisions(pack, monkeypatch, rtx):
    av, fl = tr(pack, "availability"), tr(pack, "flavour")
    s = av.engine_support(torch.device("cpu"), rtx.flavour)
    assert not s.ok and "not a CUDA GPU" in s.reason
    monkeypatch.setattr(av, "find_tensorrt", lambda prefer=None: (None, "No TensorRT is installed (...). "
                                                                       + fl.INSTALL_HINT))
    # No TensorRT: the install hint only where an engine could run (it sent CPU and RTX 30xx users to install it)
    s = av.engine_support(torch.device("cpu"))
    assert not s.ok and "not a CUDA GPU" in s.reason and "pip install" not in s.reason
    _fake_gpu(monkeypatch, (8, 6), "NVIDIA GeForce RTX 3090")
    s = av.engine_support(torch.device("cuda:0"))
    assert not s.ok and "no FP8 tensor cores" in s.reason and "pip install" not in s.reason
    _fake_gpu(monkeypatch, (8, 9), "NVIDIA GeForce RTX 4090")
    s = av.engine_support(torch.device("cuda:0"))
    assert not s.ok and "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in s.reason
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # ROCm reports gfx942 (MI300X) as capability 9.4
    _fake_gpu(monkeypatch, (9, 4), "AMD Instinct MI300X")
    for flavour in (rtx.flavour, fl.Flavour(fl.STANDARD, object(), "10.16"), None):
        s = av.engine_support(torch.device("cuda:0"), flavour)
        assert not s.ok and "AMD GPU (ROCm)" in s.reason and "pip install" not in s.reason
    monkeypatch.setattr(torch.version, "hip", None)

    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    s = av.engine_support(torch.device("cuda:0"), rtx.flavour)
    assert not s.ok and "NVIDIA H100 (compute capability 9.0)" in s.reason and "Standard TensorRT" in s.reason
    standard = fl.Flavour(fl.STANDARD, object(), "10.16")
    s = av.engine_support(torch.device("cuda:0"), standard)
    assert s.ok and s.target == "sm90-NVIDIA H100"  # standard engines are per GPU model

    _fake_gpu(monkeypatch, (8, 6), "NVIDIA GeForce RTX 3090")
    s = av.engine_support(torch.device("cuda:0"), rtx.flavour)
    assert not s.ok and "no FP8 tensor cores" in s.reason and "compute capability 8.9+" in s.reason
    _fake_gpu(monkeypatch, (8, 9), "NVIDIA GeForce RTX 4090")
    s = av.engine_support(torch.device("cuda:0"), rtx.flavour)
    assert s.ok and s.target == "sm89"
    _fake_gpu(monkeypatch, (12, 0), "NVIDIA GeForce RTX 5090")
    assert av.engine_support(torch.device("cuda:0"), rtx.flavour).target == "sm120"


def test_rtx_builder_refuses_fp8_for_ampere_so_availability_must(pack, fp8_clip, rtx):
    ox, build = tr(pack, "onnx_export"), tr(pack, "build")
    with pytest.raises(build.EngineBuildError, match="sm86"):
        build.build_engine(ox.export_text_transformer(*tower(pack, fp8_clip[1])), build.Profile(max_rows=2),
                           rtx.flavour, target="sm86")


def test_a_tensorrt_that_cannot_start_or_target_the_gpu_is_a_build_error_the_node_falls_back_on(pack, rtx):
    """Standard TensorRT whose CUDA runtime cannot start (a driver older than it needs) raises pybind11's
    "factory function returned nullptr" TypeError from its Builder, and an older TensorRT for RTX may not know
    a new GPU's compute capability: both crashed the node, whose fallback catches build errors only."""
    import onnx
    from onnx import TensorProto, helper

    build, fl = tr(pack, "build"), tr(pack, "flavour")
    real = rtx.flavour.module

    class NoCuda:
        def __getattr__(self, name):
            return getattr(real, name)

        def Builder(self, logger):
            raise TypeError("pybind11::init(): factory function returned nullptr")

    profile = build.Profile(max_rows=2)
    with pytest.raises(build.EngineBuildError, match="could not start its builder .*nullptr.*update the driver"):
        build.build_engine(b"", profile, fl.Flavour(rtx.flavour.name, NoCuda(), rtx.flavour.version))
    x = helper.make_tensor_value_info(tr(pack, "onnx_export").INPUT, TensorProto.FLOAT, ["rows", 77, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 77, 8])
    graph = helper.make_graph([helper.make_node("Relu", [x.name], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(build.EngineBuildError, match="cannot build for sm999: update it"):
        build.build_engine(model, profile, rtx.flavour, target="sm999")
    assert build.build_engine(onnx.load_from_string(model.SerializeToString()), profile, rtx.flavour,
                              target="sm89").engine


def test_node_on_a_machine_without_cuda_says_why_and_returns_the_pytorch_clip(comfy, fp8_clip):
    q = fp8_clip[1]
    out, status = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=8)
    assert out is q
    assert status.startswith("TensorRT engine not used:") and "not a CUDA GPU" in status
    assert "keeps running in PyTorch" in status
    assert torch.equal(encode(comfy, out, PROMPT)[0], encode(comfy, q, PROMPT)[0])


def test_node_needs_a_quantized_clip(comfy, fp8_clip):
    with pytest.raises(ValueError, match="not quantized by this pack.*Quantize CLIP to FP8"):
        call(comfy, "FP8CLIPTensorRTEngine", clip=fp8_clip[0], max_batch_rows=8)


def test_engine_that_cannot_be_loaded_falls_back_to_pytorch(comfy, pack, fp8_clip, rtx, monkeypatch):
    """Everything says 'go' (a GPU the flavour supports), but TensorRT cannot load the engine: here the real
    TrtRunner fails to deserialize it (no CUDA driver). The workflow goes on, on the PyTorch path."""
    av = tr(pack, "availability")
    forced = av.Support(True, "TensorRT for RTX on a GPU that is not there", rtx.flavour, "sm89",
                        torch.device("cuda:0"))
    monkeypatch.setattr(av, "engine_support", lambda device=None, flavour=None: forced)
    q = fp8_clip[1]
    out, status = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=3)
    assert out is q
    assert re.match(r"TensorRT engine not used: the engine \S+/fp8clip-clip_l-\w+\.engine is ready but could not be "
                    r"loaded", status)  # the file to delete is named
    assert torch.equal(encode(comfy, out, PROMPT)[0], encode(comfy, q, PROMPT)[0])


def test_the_engine_is_made_for_the_gpu_comfyui_runs_the_encoder_on(comfy, pack, fp8_clip, monkeypatch):
    """A CLIP or CLIP vision that a multi-GPU loader put on cuda:1 gets its engine checked, built and run there, not
    on ComfyUI's default GPU; one kept on the CPU (--lowvram) gets ComfyUI's GPU."""
    import copy

    av, node = tr(pack, "availability"), pack_module(pack, "nodes.tensorrt_engine")
    asked = []

    def support(device=None, flavour=None):
        asked.append(str(device))
        return av.Support(False, "recorded", None, "", None)

    monkeypatch.setattr(av, "engine_support", support)
    import importlib

    monkeypatch.setattr(importlib.import_module("comfy.model_management"), "get_torch_device",
                        lambda: torch.device("cuda:0"))
    for device in ("cuda:1", "cpu"):
        text = copy.copy(fp8_clip[1])
        text.patcher = fp8_clip[1].patcher.clone()
        text.patcher.load_device = torch.device(device)
        vision = copy.copy(text)
        vision.load_device = torch.device(device)
        for model, is_vision in ((text, False), (vision, True)):  # the vision stand-in: only its device matters
            assert node.run_on_engine(model, is_vision, 2)[1].startswith("TensorRT engine not used: recorded")
    assert asked == ["cuda:1", "cuda:1", "cuda:0", "cuda:0"]


# --- the node end to end, with onnxruntime executing the engine's graph -------------------------------------

def engine_graph(comfy, max_batch_rows: int, preview_status: bool = False) -> dict:
    """API-format prompt: CLIPLoader -> FP8CLIPQuantize (one prompt, one held out) -> FP8CLIPTensorRTEngine, as
    nodes 1-3 (and PreviewAny of its status as node 4)."""
    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": comfy.files["clip_l"],
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "FP8CLIPQuantize", "inputs": {
                  "clip": ["1", 0], "calibration_prompts": "a cat", "keep_high_precision": "*text_projection",
                  "method": "max", "quantize": "weights+activations", "min_cosine": 0.9, "runtime": "auto",
                  "fp8_token_embedding": True, "evaluation_prompts": "a dog"}},
              "3": {"class_type": "FP8CLIPTensorRTEngine", "inputs": {
                  "clip": ["2", 0], "max_batch_rows": max_batch_rows, "activations": "float32"}}}
    if preview_status:
        prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    return prompt


def engine_node_runs(comfy, pack, monkeypatch) -> list[int]:
    """Starts with no engines on disk; records each run of the engine nodes (its max_batch_rows)."""
    import shutil

    node = pack_module(pack, "nodes.tensorrt_engine")
    runs: list[int] = []
    real = node.run_on_engine
    monkeypatch.setattr(node, "run_on_engine", lambda *a, **k: runs.append(a[2]) or real(*a, **k))
    shutil.rmtree(comfy.base / "models" / "tensorrt", ignore_errors=True)
    return runs


def engine_files(comfy):
    return sorted((comfy.base / "models" / "tensorrt").glob("*.engine"))


def test_node_builds_caches_and_reuses_the_engine(comfy, fp8_clip, engine_node):
    import shutil

    q = fp8_clip[1]
    shutil.rmtree(comfy.base / "models" / "tensorrt", ignore_errors=True)  # a missing folder is created
    out, status = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=8)
    assert out is not q and len(engine_node) == 1 and "built in" in status
    (engine,) = engine_files(comfy)
    manifest = json.loads(engine.with_suffix(".json").read_text())
    assert manifest["engine_bytes"] == engine.stat().st_size and len(manifest["sha256"]) == 64
    assert manifest["components"]["profile"] == {"min_rows": 1, "opt_rows": 2, "max_rows": 8}
    assert manifest["components"]["flavour"] == "tensorrt-rtx" and manifest["components"]["target"] == "portable"
    assert manifest["source"]["kept"] == ["text_projection"] and manifest["source"]["fp8_layers"] == 72
    assert str(engine) in status and "FP8 weights" in status

    again, status2 = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=8)
    assert len(engine_node) == 1 and "found in the cache, no build" in status2  # second run: no build
    assert engine_files(comfy) == [engine]

    _, status3 = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=4)
    assert len(engine_node) == 2 and "built in" in status3  # another profile: another engine


def test_comfyui_runs_the_node_again_when_its_engine_file_changes(comfy, pack, engine_node, monkeypatch):
    """ComfyUI reuses a node's output while its inputs stay the same: an engine damaged or deleted after the
    node ran was rebuilt only after an input change or a restart. Now the node runs again (and rebuilds) when
    the files it used change, and only then."""
    import copy

    from harness.host import new_executor, run_graph

    runs = engine_node_runs(comfy, pack, monkeypatch)
    prompt = engine_graph(comfy, max_batch_rows=2, preview_status=True)
    ex = new_executor(comfy)

    def queue():  # as a browser queues it: a new prompt each time (ComfyUI notes IS_CHANGED in it)
        run_graph(comfy, copy.deepcopy(prompt), ex)

    queue()
    (engine,) = engine_files(comfy)
    queue()
    assert (len(runs), len(engine_node)) == (1, 1)  # unchanged: ComfyUI's cached output

    with engine.open("r+b") as f:  # damaged on disk after the node ran
        f.seek(1000)
        f.write(b"\0" * 64)
    queue()
    assert (len(runs), len(engine_node)) == (2, 2)  # run again; the cache refused the file and rebuilt it
    queue()
    assert (len(runs), len(engine_node)) == (2, 2)

    engine.unlink()
    engine.with_suffix(".json").unlink()
    queue()
    assert (len(runs), len(engine_node)) == (3, 3) and engine_files(comfy) == [engine]

    # An engine the GPU refuses: the node falls back, and the fix its message gives (delete, queue) works.
    pipeline, runners = pack_module(pack, "trt_runtime.pipeline"), pack_module(pack, "trt_runtime.runners")
    loads = pipeline.make_runner

    def refuse(*a, **k):
        raise runners.EngineLoadError(f"refused. {runners.REBUILD}")

    monkeypatch.setattr(pipeline, "make_runner", refuse)
    prompt["3"]["inputs"]["max_batch_rows"] = 1
    out = run_graph(comfy, copy.deepcopy(prompt), ex)
    assert "could not be loaded" in out["4"]["text"][0] and "queue the prompt again" in out["4"]["text"][0]
    assert "Queuing again tries again" in out["4"]["text"][0]
    assert len(runs) == 4
    queue()  # a fallback is not kept: the next queue tries again (the GPU may have the memory now)
    assert len(runs) == 5
    monkeypatch.setattr(pipeline, "make_runner", loads)
    for f in set(engine_files(comfy)) - {engine}:
        f.unlink()
    queue()
    assert len(runs) == 6 and len(engine_node) == 5
    queue()
    assert len(runs) == 6  # on its engine again: ComfyUI's cached output

    # A build that fails (out of GPU memory while building, say): falls back, and the next queue builds again.
    builds = pipeline.build_engine
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: (_ for _ in ()).throw(
        pipeline.EngineBuildError("TensorRT for RTX failed to build the engine: out of memory (simulated)")))
    prompt["3"]["inputs"]["max_batch_rows"] = 3
    out = run_graph(comfy, copy.deepcopy(prompt), ex)
    assert "out of memory (simulated)" in out["4"]["text"][0] and len(runs) == 7
    monkeypatch.setattr(pipeline, "build_engine", builds)
    queue()
    assert len(runs) == 8 and len(engine_node) == 6
    queue()
    assert len(runs) == 8


def test_two_workflows_with_one_node_id_each_run_again_when_their_own_engine_changes(comfy, pack, engine_node,
                                                                                      monkeypatch):
    """Node ids repeat across workflows, and ComfyUI's cache (v0.29's default, or --cache-lru) keeps each
    workflow's output. The node watched only the engine files of the last workflow run under its id: after
    another workflow ran, workflow A's engine could be deleted or damaged and A, queued again, reused its
    output (whose first encode then failed, and queuing again did not help)."""
    import copy

    from harness.host import new_executor, run_graph

    runs = engine_node_runs(comfy, pack, monkeypatch)
    a, b = (engine_graph(comfy, max_batch_rows=rows, preview_status=True) for rows in (2, 1))
    ex = new_executor(comfy, lru=20)

    def queue(prompt):
        run_graph(comfy, copy.deepcopy(prompt), ex)

    queue(a)
    (engine_a,) = engine_files(comfy)
    queue(b)
    queue(a)
    assert runs == [2, 1] and len(engine_node) == 2  # A's output came from ComfyUI's cache
    engine_a.unlink()
    engine_a.with_suffix(".json").unlink()
    queue(a)
    assert runs == [2, 1, 2] and len(engine_node) == 3 and engine_a.exists()  # A ran again and rebuilt it
    queue(a)
    assert runs == [2, 1, 2]


@pytest.fixture
def engine_clip(comfy, fp8_clip, engine_node):
    return call(comfy, "FP8CLIPTensorRTEngine", clip=fp8_clip[1], max_batch_rows=8)[0]


def test_engine_clip_encodes_like_the_pytorch_fp8_clip(comfy, pack, fp8_clip, engine_clip):
    original, q, _ = fp8_clip
    (ref, ref_pooled), (got, pooled) = encode(comfy, q, PROMPT), encode(comfy, engine_clip, PROMPT)
    assert got.shape == ref.shape == (1, 77, 768) and pooled.shape == (1, 768)
    print(f"\nengine CLIP vs PyTorch FP8 CLIP: conditioning {cosine(got, ref):.5f}, pooled "
          f"{cosine(pooled, ref_pooled):.5f}")
    assert cosine(got, ref) > 0.999 and cosine(pooled, ref_pooled) > 0.998
    assert cosine(got, encode(comfy, original, PROMPT)[0]) > 0.99
    # the input CLIP is untouched: its transformer is still the PyTorch one, encoding as the Q->DQ model it came
    # from bit for bit (as it does on the CPU, test_fp8_runtime.py)
    assert type(tower(pack, q)[0]).__name__ == "FP8TextModel"
    assert torch.equal(ref, encode(comfy, fp8_clip[2], PROMPT)[0])


def test_lora_after_the_engine_node_is_refused_not_ignored(comfy, engine_clip):
    _, lq = call(comfy, "LoraLoader", model=None, clip=engine_clip, lora_name=comfy.files["lora"],
                 strength_model=0.0, strength_clip=1.0)
    with pytest.raises(Exception, match="Apply LoRAs to the CLIP before the Quantize node"):
        encode(comfy, lq, PROMPT)


def test_saving_the_engine_clip_names_the_clip_to_save(comfy, engine_clip):
    with pytest.raises(ValueError, match="runs on a TensorRT engine, which cannot be saved.*goes into 'Build TensorRT"):
        call(comfy, "FP8CLIPSave", clip=engine_clip, filename="fp8test/engine_clip",
             format="fp8 + scales (Load FP8 CLIP)", overwrite=False)


def test_lora_between_the_quantize_and_engine_nodes_is_refused_not_built_without(comfy, fp8_clip, engine_node):
    _, lq = call(comfy, "LoraLoader", model=None, clip=fp8_clip[1], lora_name=comfy.files["lora"],
                 strength_model=0.0, strength_clip=1.0)
    builds = len(engine_node)
    with pytest.raises(Exception, match="Apply LoRAs to the CLIP before the Quantize node"):
        call(comfy, "FP8CLIPTensorRTEngine", clip=lq, max_batch_rows=8)
    assert len(engine_node) == builds  # nothing built from the weights without the LoRA


def test_engine_clip_clip_skip_weights_long_prompts_and_embeddings(comfy, fp8_clip, engine_clip):
    q = fp8_clip[1]
    (q_skip,) = call(comfy, "CLIPSetLastLayer", clip=q, stop_at_clip_layer=-2)
    (e_skip,) = call(comfy, "CLIPSetLastLayer", clip=engine_clip, stop_at_clip_layer=-2)
    r, e = encode(comfy, q_skip, PROMPT)[0], encode(comfy, e_skip, PROMPT)[0]
    assert cosine(r, e) > 0.999 and cosine(e, encode(comfy, engine_clip, PROMPT)[0]) < 0.99  # another layer

    weighted = "a (red:1.5) balloon over a (grey:0.6) city"
    assert cosine(encode(comfy, q, weighted)[0], encode(comfy, engine_clip, weighted)[0]) > 0.999

    long = ", ".join(f"detail number {i}" for i in range(60))
    r, e = encode(comfy, q, long)[0], encode(comfy, engine_clip, long)[0]
    assert e.shape == r.shape and e.shape[1] >= 3 * 77 and cosine(r, e) > 0.999

    emb = comfy.files["embedding"].rsplit(".", 1)[0]
    with_emb = f"a portrait in the style of embedding:{emb}"
    r, e = encode(comfy, q, with_emb)[0], encode(comfy, engine_clip, with_emb)[0]
    assert cosine(r, e) > 0.999
    assert cosine(e, encode(comfy, engine_clip, "a portrait in the style of")[0]) < 0.995  # embedding used


def test_prompt_longer_than_the_profile_names_the_limit_and_the_fix(comfy, fp8_clip, engine_node):
    small = call(comfy, "FP8CLIPTensorRTEngine", clip=fp8_clip[1], max_batch_rows=2)[0]
    assert encode(comfy, small, "a (red:1.2) cat")[0].shape == (1, 77, 768)  # 2 rows: fits
    long = ", ".join(f"detail number {i}" for i in range(60))
    with pytest.raises(ValueError, match=r"needs 4 rows of 77 tokens.*at most 2\. Raise max_batch_rows on the "
                                         r"'Build TensorRT Engine for FP8 CLIP' node to at least 4"):
        encode(comfy, small, long)


def test_engine_memory_is_reported_to_comfyui(comfy, pack, fp8_clip, engine_clip):
    original, q, _ = fp8_clip
    em = tower(pack, engine_clip)[0]
    assert type(em).__name__ == "EngineTextModel"
    engine_bytes = em.runner.device_bytes()
    torch_side = sum(t.nbytes for t in em.state_dict().values())  # token embedding, projection, final LayerNorm
    assert engine_bytes > 80 * 2**20 and torch_side > 49408 * 768  # an FP8 engine; FP8 token table
    # ComfyUI budgets the engine plus the torch layers beside it, not the FP8 Linear weights a second time
    assert engine_clip.patcher.model_size() == pytest.approx(engine_bytes + torch_side, rel=0.01)
    assert engine_clip.patcher.model_size() < original.patcher.model_size()


def test_quantizing_an_engine_clip_again_is_refused(comfy, engine_clip):
    from test_quantize_clip import quantize

    with pytest.raises(ValueError, match="already quantized"):
        quantize(comfy, engine_clip, calibration_prompts="a cat")
    with pytest.raises(ValueError, match="already runs on a TensorRT engine"):
        call(comfy, "FP8CLIPTensorRTEngine", clip=engine_clip, max_batch_rows=8)


# --- the quantize node's `tensorrt` runtime --------------------------------------------------------------------

def test_quantize_node_tensorrt_runtime_falls_back_to_fp8_or_puts_the_clip_on_the_engine(comfy, pack, fp8_clip,
                                                                                          request):
    """On this machine (no CUDA GPU) the choice still gives a working FP8 CLIP, and the report says why; where
    an engine can run (the engine_node stand-in), the CLIP runs on it. (One test: the second run of the node
    reuses the first's calibration, as in a workflow where only the runtime changes.)"""
    from test_quantize_clip import quantize

    from conftest import CALIBRATION_SMALL

    out = quantize(comfy, fp8_clip[0], calibration_prompts=CALIBRATION_SMALL, runtime="tensorrt")
    clip, text = out["result"]
    assert "TensorRT engine not used:" in text and "not a CUDA GPU" in text
    assert "keeps running in PyTorch" in text
    assert cosine(encode(comfy, clip, PROMPT)[0], encode(comfy, fp8_clip[1], PROMPT)[0]) > 0.999

    builds = request.getfixturevalue("engine_node")  # from here on, as on a supported GPU
    out = quantize(comfy, fp8_clip[0], calibration_prompts=CALIBRATION_SMALL, runtime="tensorrt")
    clip, text = out["result"]
    assert "TensorRT engine: " in text and "clip_l:" in text and len(builds) <= 1
    assert type(tower(pack, clip)[0]).__name__ == "EngineTextModel"
    assert cosine(encode(comfy, clip, PROMPT)[0], encode(comfy, fp8_clip[1], PROMPT)[0]) > 0.999


def test_engine_of_a_clip_comfyui_keeps_on_the_cpu_is_loaded_per_encode(comfy, pack, fp8_clip, rtx, engine_node,
                                                                         monkeypatch):
    """--lowvram and --novram keep text encoders on the CPU: ComfyUI never moves such a CLIP to the GPU or back,
    so nothing would release its engine's GPU memory. (The engine here is onnxruntime on the CPU, named a CUDA
    runner: what is checked is when the pack releases it, and that the status says so.)"""
    import dataclasses

    pipeline, cache = pack_module(pack, "trt_runtime.pipeline"), pack_module(pack, "trt_runtime.cache")
    on_gpu = dataclasses.replace(rtx, ok=True, device=torch.device("cuda", 0))
    with torch.inference_mode():
        out, status = pipeline.engine_clip(fp8_clip[1], 8, on_gpu,
                                           cache_root=cache.register_folder(comfy.folder_paths)[0])
    assert ("ComfyUI runs this CLIP on cpu (--lowvram, --novram or the loader's device): the engine runs on cuda:0 "
            "and is loaded for each encode" in status)
    tower = pack_module(pack, "quant.proxy").unwrap(out.patcher.get_model_object("clip_l.transformer"))
    released = []
    monkeypatch.setattr(tower.runner, "device", torch.device("cuda", 0))
    monkeypatch.setattr(tower.runner, "release", lambda: released.append(1), raising=False)
    first, _ = encode(comfy, out, PROMPT)
    again, _ = encode(comfy, out, PROMPT)
    assert len(released) == 2 and torch.equal(first, again)

    class OnTheGPU:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(tower, "_probe", lambda: OnTheGPU)
    encode(comfy, out, "another prompt")
    assert len(released) == 2  # layers on the GPU: ComfyUI's unload releases the engine, not each encode


def test_comfyuis_unload_releases_the_engine(pack):
    """ComfyUI unloads a CLIP through the pack's proxy, which puts the tower's host copies back without calling
    its .to(): the engine's GPU memory stayed allocated for as long as the CLIP lived, while ComfyUI counted it
    as freed. ('meta' stands in for the GPU; the runner counts its releases.)"""
    engine_module, proxy = pack_module(pack, "trt_runtime.engine_module"), pack_module(pack, "quant.proxy")
    artifact = pack_module(pack, "quant.artifact")

    class Runner:
        device, released = torch.device("cuda", 0), 0

        def release(self):
            self.released += 1

    src = torch.nn.Module()
    src.text_model = torch.nn.Module()
    src.text_model.embeddings = torch.nn.Module()
    src.text_model.embeddings.token_embedding = torch.nn.Embedding(10, 8)
    src.text_model.final_layer_norm = torch.nn.LayerNorm(8)
    src.text_projection, src.num_layers = torch.nn.Linear(8, 8, bias=False), 2
    artifact.attach(src, object())  # a quantized tower carries its record: the proxy keeps a host copy of it
    engine = engine_module.EngineTextModel(src, Runner(), max_rows=8)
    tp = proxy.TowerProxy(engine, src, "meta", "cpu")
    for cycle in (1, 2):
        tp._to_load_device()  # an encode
        assert engine.runner.released == cycle - 1 and engine._probe().device.type == "meta"
        tp.offload(unpatch_all=True)  # ComfyUI's unload (ON_DETACH)
        assert engine.runner.released == cycle and engine._probe().device.type == "cpu"
    tp.offload(unpatch_all=False)  # v0.29 detaches every clone before each load: no unload, nothing released
    assert engine.runner.released == 2


def test_engine_tower_called_with_token_ids_alone_matches_the_fp8_tower(pack, fp8_clip, engine_clip):
    """ComfyUI's CLIPTextModel also takes token ids without embeddings or num_tokens, pooling at the end token
    (custom nodes call it so); the engine's drop-in raised a TypeError there."""
    unwrap = pack_module(pack, "quant.proxy").unwrap
    tower = unwrap(engine_clip.patcher.get_model_object("clip_l.transformer"))
    fp8 = unwrap(fp8_clip[1].patcher.get_model_object("clip_l.transformer"))
    tokens = torch.tensor([[49406, 320, 2368, 525, 320, 6448, 49407] + [49407] * 70])
    with torch.inference_mode():
        last, _, projected, pooled = tower(input_tokens=tokens)
        ref_last, _, ref_projected, ref_pooled = fp8(input_tokens=tokens)
    assert pooled.shape == ref_pooled.shape == (1, 768)
    assert cosine(last, ref_last) > 0.99 and cosine(pooled, ref_pooled) > 0.99
    assert cosine(projected, ref_projected) > 0.99


def test_tensorrt_errors_reach_the_console_and_warnings_stay_with_the_message(pack, rtx, caplog):
    """A failed engine run said "see the TensorRT messages in the log" while nothing was logged."""
    trt = rtx.flavour.module
    log = pack_module(pack, "trt_runtime.build")._logger(trt)
    with caplog.at_level("WARNING"):
        log.log(trt.ILogger.Severity.WARNING, "a warning builds emit by the dozen")
        log.log(trt.ILogger.Severity.ERROR, "an error the user must see")
    assert [r.getMessage() for r in caplog.records] == ["TensorRT: an error the user must see"]
    assert len(log.lines) == 2  # both go into the error message of a failed load or run
