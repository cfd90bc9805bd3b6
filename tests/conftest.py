"""Test set-up: a real ComfyUI host in this process, with the pack loaded by ComfyUI's own loader.

FP8CLIP_HOST picks the host tree (default: .hosts/comfyui-0.3.75 from harness/setup.sh).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run ComfyUI with --cpu, so the pack's Triton kernels (quant/fp8_fused.py, GPU kernels) run in
# Triton's CPU interpreter, which has to be chosen before the kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import fixtures, host  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The booted host: `.nodes`, `.execution`, `.folder_paths`, `.base`, `.files` (fixture names)."""
    base = tmp_path_factory.mktemp("comfy-base")
    host.make_base(base)
    files = fixtures.populate(base)
    h = host.boot_in_process(base)
    h.files = files
    return h


@pytest.fixture(autouse=True)
def fresh_calibrations():
    """Each test calibrates for itself: the quantize nodes remember calibrations per CLIP object
    (quant/calibration_memo.py), and the session's CLIPs are shared by many tests."""
    for name, mod in list(sys.modules.items()):
        if name.endswith("quant.calibration_memo"):
            mod.forget_all()


@pytest.fixture
def scratch():
    """Registers files a test writes into the shared models folders; they are deleted when the test ends.
    Each is 100-300 MB and CI disks can be nearly full, so nothing big outlives the test that made it."""
    made: list[Path] = []

    def register(path):
        made.append(Path(path))
        return path

    yield register
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's modules as ComfyUI loaded them (module names are ComfyUI's, not ours)."""
    name = str(comfy.base / "custom_nodes" / host.PACK_NAME).replace(".", "_x_")
    return sys.modules[name]


def node(comfy, node_id: str):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id]()


def call(comfy, node_id: str, **inputs):
    """Run one node's function as the executor does (inference mode); returns its result tuple."""
    n = node(comfy, node_id)
    with torch.inference_mode():
        out = getattr(n, n.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def encode(comfy, clip, text: str):
    """CLIPTextEncode's conditioning tensor and pooled output."""
    (cond,) = call(comfy, "CLIPTextEncode", clip=clip, text=text)
    return cond[0][0], cond[0][1].get("pooled_output")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-token cosine similarity."""
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2),
                                                       dim=-1).mean())


def pack_module(pack, name: str):
    """A submodule of the pack as ComfyUI loaded it, e.g. pack_module(pack, "trt_runtime.cache")."""
    import importlib

    return importlib.import_module(f"{pack.__name__}.{name}")


CALIBRATION_SMALL = "a cat\na castle at night\n(a red car:1.2)\nportrait of an old fisherman, weathered skin"


@pytest.fixture(scope="session")
def fp8_clip(comfy, pack):
    """(original CLIP-L, FP8 W8A8 clone on the fp8 runtime, the same on the fake-quant runtime), calibrated once
    by the quantize node on a few prompts."""
    from test_quantize_clip import quantize

    (clip,) = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")
    fake = quantize(comfy, clip, calibration_prompts=CALIBRATION_SMALL, runtime="fake-quant")["result"][0]
    with torch.inference_mode():
        fp8, _ = pack_module(pack, "quant.runtime").to_fp8_runtime(fake, "fp8")
    return clip, fp8, fake


@pytest.fixture(scope="session")
def clip(comfy):
    """CLIP-L as Load CLIP gives it (a module may have its own)."""
    (c,) = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")
    return c


@pytest.fixture(scope="session")
def quantized(comfy, clip):
    """The quantize node with every widget at its default (built-in 64 prompts): (clip, report, node output)."""
    from test_quantize_clip import quantize

    out = quantize(comfy, clip)
    return out["result"][0], out["result"][1], out


@pytest.fixture(scope="module")
def rtx(pack):
    """TensorRT for RTX's build-only support: real engine builds without a GPU."""
    support = pack_module(pack, "trt_runtime.availability").build_only_support()
    if not support.ok:
        pytest.fail(f"TensorRT for RTX must be installed for these tests (harness/setup.sh does): {support.reason}")
    return support


@pytest.fixture
def engine_node(comfy, pack, rtx, monkeypatch):
    """The TensorRT nodes as on a supported GPU: real export, build and cache; the engine's graph runs in
    onnxruntime (no engine can execute on the machines this is tested on). Returns a counter of real builds."""
    av, pipeline, runners, ox, build = (pack_module(pack, f"trt_runtime.{n}") for n in
                                        ("availability", "pipeline", "runners", "onnx_export", "build"))
    ok = av.Support(True, rtx.reason, rtx.flavour, rtx.target, torch.device("cpu"))
    monkeypatch.setattr(av, "engine_support", lambda device=None, flavour=None: ok)

    def ort_runner(engine, support, module, record):
        data = engine.read()  # the engine file passes the cache's checks
        dtype = pipeline.ACTIVATIONS[engine.manifest["components"]["compute_dtype"]]
        runner = runners.OrtRunner(ox.export_transformer(module, record, compute_dtype=dtype))
        runner.device_bytes = lambda: len(data)  # what TrtRunner reports before the engine is loaded
        return runner

    monkeypatch.setattr(pipeline, "make_runner", ort_runner)
    builds = []
    real = build.build_engine
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: builds.append(1) or real(*a, **k))
    return builds


def cancel_after_the_first_check(mm, monkeypatch) -> None:
    """The UI's cancel button pressed once the node is running: its first interrupt check passes, later ones stop."""
    checks = []
    real = mm.throw_exception_if_processing_interrupted

    def check():
        checks.append(1)
        if len(checks) > 1:
            mm.interrupt_current_processing(True)
        real()
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", check)


def fp8_conversions_when_cancelled(pack, monkeypatch, run) -> int:
    """Calls `run()` with the cancel button pressed after the node's first interrupt check; it must stop with
    ComfyUI's interrupt. Returns how many FP8 conversions it started before it stopped."""
    import comfy.model_management as mm

    runtime, conversions = pack_module(pack, "quant.runtime"), []
    with monkeypatch.context() as m:
        real = runtime.to_fp8_runtime
        m.setattr(runtime, "to_fp8_runtime", lambda *a, **k: (conversions.append(1), real(*a, **k))[1])
        cancel_after_the_first_check(mm, m)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                run()
        finally:
            mm.interrupt_current_processing(False)
    return len(conversions)


def record_tower_loads_and_folds(pack, monkeypatch) -> list[str]:
    """A list that gets "load" when a quantized tower is put on its load device (the GPU; a no-op on this CPU)
    and "fold" when ModelOpt folds Q->DQ weights: folding on the offload device is CPU work of seconds."""
    proxy, bridge, events = pack_module(pack, "quant.proxy"), pack_module(pack, "quant.modelopt_bridge"), []
    load, fold = proxy.TowerProxy._to_load_device, bridge.fold_weights
    monkeypatch.setattr(proxy.TowerProxy, "_to_load_device", lambda self: (events.append("load"), load(self))[1])
    monkeypatch.setattr(bridge, "fold_weights", lambda *a, **k: (events.append("fold"), fold(*a, **k))[1])
    return events
