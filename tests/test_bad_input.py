"""Bad input gets a message that names the problem and the fix; nothing is changed or left behind."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

from conftest import call, encode, fp8_conversions_when_cancelled
from test_quantize_clip import PROMPT, quantize


@pytest.fixture(scope="module")
def clip(comfy):
    return call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")[0]


def test_no_clip(comfy):
    with pytest.raises(ValueError, match="No CLIP is connected"):
        quantize(comfy, None)


def test_not_a_clip(comfy):
    (vae_like,) = call(comfy, "EmptyLatentImage", width=64, height=64, batch_size=1)
    with pytest.raises(ValueError, match=r"Expected a CLIP .*got dict"):
        quantize(comfy, vae_like)


@pytest.mark.parametrize("text", ["", "   \n\t\n  ", "# only a comment\n"])
def test_empty_calibration_text(comfy, clip, text):
    with pytest.raises(ValueError, match="calibration prompts are empty"):
        quantize(comfy, clip, calibration_prompts=text)


def test_keeping_every_layer_is_refused_with_the_fix(comfy, clip):
    """'clip_l.*' keeps all of SD1.5's layers: ModelOpt's own error spoke of MoE layouts and pipeline parallelism."""
    with pytest.raises(ValueError, match=r"Nothing to quantize in this model: the keep_high_precision patterns "
                                         r"\(clip_l\.\*\) match all 73 of its Linear layers\. Remove the pattern"):
        quantize(comfy, clip, calibration_prompts="a cat", keep_high_precision="clip_l.*")


def test_a_layer_with_nan_weights_is_kept_as_it_is_and_named(comfy):
    """SDXL checkpoints carry no CLIP-L projection; ComfyUI leaves it uninitialized, NaN on an H100. With the
    keep list cleared, ModelOpt's calibration used to stop on `detected nan values in amax`."""
    clip = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")[0]
    with torch.inference_mode():  # the loader made inference tensors
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.fill_(float("nan"))
    q, text = quantize(comfy, clip, calibration_prompts="a cat\na castle at night", keep_high_precision="",
                       evaluation_prompts="a dog on a beach\na red car")["result"]
    print("\n" + text)
    assert "kept in high precision: clip_l.text_projection" in text
    assert "weights not finite (NaN/inf" in text and "clip_l.text_projection" in text
    ref, got = encode(comfy, clip, PROMPT)[0], encode(comfy, q, PROMPT)[0]
    assert torch.isfinite(got).all() and torch.nn.functional.cosine_similarity(
        ref.flatten(1), got.flatten(1)).item() > 0.99
    (info,) = call(comfy, "FP8CLIPSave", clip=q, filename="fp8test/nan_projection",
                   format="fp8 + scales (Load FP8 CLIP)", overwrite=True)
    path = Path(info.split("Saved ", 1)[1].splitlines()[0])
    assert path.is_file()  # its scales are finite: the file format refuses others
    path.unlink()


def test_unsupported_clip_type_names_the_supported_ones(comfy):
    (t5,) = call(comfy, "CLIPLoader", clip_name=comfy.files["t5_stub"], type="stable_audio")
    with pytest.raises(ValueError, match=r"has no CLIP text tower.*Supported: text encoders with CLIP-L, CLIP-G or CLIP-H"):
        quantize(comfy, t5)


def test_a_device_without_float8_tensors_is_refused_with_the_fix(comfy, pack, clip):
    """Apple GPUs (MPS) hold no float8 tensors (ComfyUI's supports_cast says so): ModelOpt's Q->DQ and FP8
    weights would fail there with PyTorch's message. ComfyUI puts encoders there with --gpu-only."""
    on_mps = clip.clone()
    on_mps.patcher.load_device = torch.device("mps")
    fix = r"ComfyUI runs this CLIP on mps, and Apple GPUs \(MPS\) cannot hold .* start ComfyUI without --gpu-only"
    with pytest.raises(ValueError, match=fix):
        quantize(comfy, on_mps, calibration_prompts="a cat")
    runtime = importlib.import_module(f"{pack.__name__}.quant.runtime")
    for requested in ("auto", "fp8", "fp8-compiled"):
        with pytest.raises(ValueError, match=fix):
            runtime.plan(requested, torch.device("mps"))
    assert runtime.plan("auto", torch.device("cpu")).runtime == "fp8"


def test_comfyui_loads_the_pack_without_importing_modelopt_or_tensorrt(tmp_path):
    """README: ModelOpt is imported the first time a quantize node runs, so ComfyUI starts, and the nodes load,
    without it (and without TensorRT, imported by the engine nodes only). In a fresh process: this one has
    imported them for other tests."""
    import subprocess
    import sys

    child = ("import sys; from pathlib import Path; from harness import host; "
             f"h = host.boot_in_process(Path({str(tmp_path)!r})); "
             "print('NODES', 'FP8CLIPQuantize' in h.nodes.NODE_CLASS_MAPPINGS); "
             "print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'modelopt', 'tensorrt', "
             "'tensorrt_rtx_bindings', 'onnx', 'onnxruntime'}))")
    run = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).resolve().parent.parent, timeout=300,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "NODES True" in run.stdout and "IMPORTED []" in run.stdout, (run.stdout[-2000:], run.stderr[-2000:])


@pytest.mark.parametrize("installed, msg", [
    (None, r"NVIDIA Model Optimizer \(pip package nvidia-modelopt\), which the quantize nodes calibrate with, is not "
           r"installed: install it into ComfyUI's own Python: .* -m pip install -r custom_nodes/comfyui-fp8-clip/"
           r"requirements.txt"),
    ("0.44.0", r"nvidia-modelopt 0.44.0 is installed; this pack works with 0.47.x \(nvidia-modelopt>=0.47,<0.48\): "
               r"install it into ComfyUI's own Python"),
], ids=["missing", "too-old"])
def test_a_missing_or_unsupported_modelopt_is_named_with_the_fix(comfy, pack, clip, monkeypatch, installed, msg):
    """Without ModelOpt the node said "No module named 'modelopt'" (not the pip name); ModelOpt 0.40 and 0.44 failed
    deep inside calibration (a pydantic ValidationError; "parent_class 'nn.Embedding' not found")."""
    import types
    from importlib import metadata

    bridge = importlib.import_module(f"{pack.__name__}.quant.modelopt_bridge")

    def version(name):
        if name != "nvidia-modelopt" or installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    real_find = bridge.importlib.util.find_spec
    monkeypatch.setattr(bridge, "metadata", types.SimpleNamespace(version=version,
                                                                  PackageNotFoundError=metadata.PackageNotFoundError))
    monkeypatch.setattr(bridge.importlib.util, "find_spec", lambda n, *a: None if n == "modelopt" else real_find(n, *a))
    bridge.require_modelopt.cache_clear()
    try:
        with pytest.raises(ValueError, match=msg):
            quantize(comfy, clip, calibration_prompts="a cat")
    finally:
        bridge.require_modelopt.cache_clear()


def test_a_modelopt_that_cannot_be_imported_is_named_with_the_fix_before_any_encode(comfy, pack, clip, monkeypatch):
    """An install whose import fails (a dependency missing, a torch it does not work with) surfaced as a bare
    ImportError after the reference encodes (minutes for SDXL on a CPU): found by review."""
    bridge = importlib.import_module(f"{pack.__name__}.quant.modelopt_bridge")
    calibrate = importlib.import_module(f"{pack.__name__}.quant.calibrate")
    encodes = []
    monkeypatch.setattr(bridge, "_mtq", lambda: (_ for _ in ()).throw(ImportError("No module named 'pulp'")))
    for name in ("encode_all", "encode_together"):  # the report's reference encodes, then calibration's
        monkeypatch.setattr(calibrate, name, lambda *a, **k: encodes.append(1))
    with pytest.raises(ValueError, match=r"nvidia-modelopt .* is installed but cannot be imported \(ImportError: No "
                                         r"module named 'pulp'\)\. Reinstall it and its dependencies: install it "
                                         r"into ComfyUI's own Python"):
        quantize(comfy, clip, calibration_prompts="a cat")
    assert encodes == []


def test_comparing_empty_conditionings_names_the_fix(comfy):
    with pytest.raises(ValueError, match="The conditionings are empty: connect the outputs of two CLIPTextEncode"):
        call(comfy, "FP8CLIPCompareConditioning", reference=[], candidate=[])


def test_quantizing_twice_is_refused(comfy, fp8_clip):
    for q in fp8_clip[1:]:  # the FP8 runtime's and the fake-quant one's
        with pytest.raises(ValueError, match="already quantized"):
            quantize(comfy, q, calibration_prompts="a cat")


def test_interrupt_during_calibration_stops_and_leaves_the_clip_untouched(comfy, pack, clip, monkeypatch):
    import comfy.model_management as mm
    from comfy.utils import ProgressBar

    before = encode(comfy, clip, PROMPT)[0]
    patches_before = (dict(clip.patcher.object_patches), dict(clip.patcher.patches))
    seen = []
    orig = ProgressBar.update_absolute

    def press_cancel_once_calibrating(self, value, total=None, preview=None):
        seen.append(value)
        if value > 24:  # past the original's encodes of the 24 held-out prompts
            mm.interrupt_current_processing(True)  # what the UI's cancel button sets
        return orig(self, value, total, preview)

    monkeypatch.setattr(ProgressBar, "update_absolute", press_cancel_once_calibrating)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            quantize(comfy, clip)
    finally:
        mm.interrupt_current_processing(False)
    # stopped after the first group of calibration prompts, not after the 64 + 2 x 24 of the whole run
    cal = importlib.import_module(f"{pack.__name__}.quant.calibrate")
    first = len(cal.calibration_groups(clip, importlib.import_module(f"{pack.__name__}.quant.prompts")
                                       .CALIBRATION_PROMPTS)[0])
    assert [v for v in seen if v > 24] == [24 + first] and first < 64
    assert (dict(clip.patcher.object_patches), dict(clip.patcher.patches)) == patches_before
    assert torch.equal(encode(comfy, clip, PROMPT)[0], before)


def test_cancel_while_a_remembered_calibration_is_rebuilt_stops_the_node(comfy, pack, clip, monkeypatch):
    """Changing only the runtime reuses the calibration, and that path takes seconds (SDXL, ViT-H: model copy,
    quantizers, FP8 conversion) that the cancel button must cut short, before the FP8 conversion; the memo
    survives it."""
    prompts = "a red bicycle\na bowl of soup"
    quantize(comfy, clip, calibration_prompts=prompts, runtime="fake-quant")
    patches_before = (dict(clip.patcher.object_patches), dict(clip.patcher.patches))
    run = lambda: quantize(comfy, clip, calibration_prompts=prompts, runtime="auto")  # noqa: E731
    assert fp8_conversions_when_cancelled(pack, monkeypatch, run) == 0
    assert (dict(clip.patcher.object_patches), dict(clip.patcher.patches)) == patches_before
    again = quantize(comfy, clip, calibration_prompts=prompts, runtime="fake-quant")["result"][1]
    assert "Calibration and report reused from the run at" in again


def test_errors_reach_the_ui_through_the_executor(comfy):
    from harness.host import run_graph

    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": comfy.files["clip_l"],
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "FP8CLIPQuantize", "inputs": {
                  "clip": ["1", 0], "calibration_prompts": "  ", "keep_high_precision": "",
                  "method": "max", "quantize": "weights+activations", "min_cosine": 0.99, "runtime": "auto", "fp8_token_embedding": True}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    with pytest.raises(RuntimeError, match="calibration prompts are empty"):
        run_graph(comfy, prompt)


def test_a_list_of_clips_or_settings_is_refused_with_the_fix(comfy, clip):
    """Prompt lists are merged (test_quantize_clip.py); a list anywhere else has no single meaning."""
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FP8CLIPQuantize"]()
    widgets = dict(calibration_prompts=["a cat"], keep_high_precision=[""], method=["max"],
                   quantize=["weights+activations"], min_cosine=[0.99], runtime=["auto"], fp8_token_embedding=[True])
    with pytest.raises(ValueError, match=r"'clip' received a list of 2 values, but this node takes one \(it takes "
                                         r"lists only for calibration_prompts and evaluation_prompts\)\. Wire a "
                                         r"single clip, or one quantize node per value"):
        node.quantize_lists(clip=[clip, clip], **widgets)
    with pytest.raises(ValueError, match="'method' received a list of 2 values"):
        node.quantize_lists(clip=[clip], **{**widgets, "method": ["max", "mse"]})
    # scripts that call the node's FUNCTION with plain values, as before it took lists, still work
    with pytest.raises(ValueError, match="calibration prompts are empty"):
        node.quantize_lists(clip=clip, **{**{k: v[0] for k, v in widgets.items()}, "calibration_prompts": "  "})


def test_an_embedding_with_inf_in_it_gets_the_cause_not_modelopts_assertion(comfy, clip, scratch):
    """NaN or inf reaching the activations (here from a textual-inversion file) failed calibration with ModelOpt's
    bare "detected nan values in amax", naming no layer, cause or fix (found by review)."""
    from safetensors.torch import save_file

    path = scratch(comfy.base / "models" / "embeddings" / "fp8clip-inf.safetensors")
    emb = torch.zeros(1, 768)
    emb[0, 3] = float("inf")
    save_file({"emb_params": emb}, str(path))
    with pytest.raises(ValueError, match=r"activations hold NaN or infinite values on the calibration prompts.*"
                                         r"an `embedding:` \(textual inversion\) file"):
        quantize(comfy, clip, calibration_prompts="embedding:fp8clip-inf a cat", evaluation_prompts="a dog")
