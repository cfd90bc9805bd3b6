"""TensorRT engines for the FP8 CLIP vision tower (IP-Adapter / unCLIP image encoders).

Model: ViT-H/14's width, heads and GELU with 4 of its 32 layers (the fixture the vision tests use for speed),
quantized by the pack's node. What runs here, for real: the export (pixel values in), onnxruntime executing it,
TensorRT for RTX's parser and builder (no GPU needed), the cache, the node in a real ComfyUI and CLIPVisionEncode
on its output, the fallback decisions. What cannot: executing an engine (TensorRT for RTX refuses compute
capability 9.0, the GPUs this project has, and deserializing needs a GPU); where a test needs the engine's
output, the node's runner is onnxruntime running the very ONNX graph the engine was built from.
"""
from __future__ import annotations

import json
import re

import onnx
import pytest
import torch
import torch.nn.functional as F

from conftest import call, node, pack_module

PIXELS = (3, 224, 224)


def tr(pack, name):
    return pack_module(pack, f"trt_runtime.{name}")


def tower(pack, cv):
    ((module, record),) = pack_module(pack, "quant.artifact").quantized_towers(cv).values()
    return module, record


def images(n: int, seed: int):
    import importlib
    return importlib.import_module("quant.images").synthetic_images(n, seed=seed)[0]


def vision_encode(comfy, cv, img):
    return call(comfy, "CLIPVisionEncode", clip_vision=cv, image=img, crop="center")[0]


def cos_min(a, b) -> float:
    """Worst per-row cosine (per image for embeddings, per token for hidden states)."""
    return float(F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1).min())


@pytest.fixture(scope="module")
def vit_h4(comfy, tmp_path_factory):
    """ComfyUI's own ClipVisionModel with ViT-H/14's config cut to 4 layers, and the fixture's weights."""
    from comfy.clip_vision import ClipVisionModel
    from comfy.utils import load_torch_file

    cfg = json.loads((comfy.host / "comfy" / "clip_vision_config_h.json").read_text())
    cfg["num_hidden_layers"] = 4
    p = tmp_path_factory.mktemp("vit_h4") / "h4.json"
    p.write_text(json.dumps(cfg))
    cv = ClipVisionModel(str(p))
    cv.load_sd(load_torch_file(str(comfy.base / "models" / "clip_vision_reduced" / comfy.files["vit_h_4layers"])))
    return cv


@pytest.fixture(scope="module")
def fp8_cv(comfy, vit_h4):
    """The FP8 CLIP_VISION (PyTorch FP8 runtime) as the quantize node returns it."""
    n = node(comfy, "FP8CLIPVisionQuantize")
    with torch.inference_mode():
        out = n.quantize(clip_vision=vit_h4, keep_high_precision="*patch_embedding*", method="max",
                         quantize="weights+activations", min_cosine=0.9, runtime="auto",
                         images=images(4, seed=8), evaluation_images=images(2, seed=9))
    return out["result"][0]




def pixels_of(vit_h4, img):
    from comfy.clip_vision import clip_preprocess

    return clip_preprocess(img, size=vit_h4.image_size, mean=vit_h4.image_mean, std=vit_h4.image_std,
                           crop=True).float()


# --- the exported graph ----------------------------------------------------------------------------------

def test_vision_graph_takes_pixels_and_stores_fp8_weights(pack, fp8_cv):
    ox = tr(pack, "onnx_export")
    module, record = tower(pack, fp8_cv)
    assert type(module).__name__ == "FP8VisionModel"
    model = ox.export_transformer(module, record)
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} == {""}  # standard ops only: onnxruntime and TensorRT read it
    io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in [*model.graph.input, *model.graph.output]}
    assert io == {"pixel_values": ["batch", *PIXELS], "last_hidden": ["batch", 257, 1280],
                  "hidden_states": ["batch", 4, 257, 1280]}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 24  # every Linear input of the 4 blocks
    assert ops.count("DequantizeLinear") == 48  # those, plus the 24 FP8 weights
    assert "causal_mask" not in {t.name for t in model.graph.initializer}  # images attend both ways
    spec = ox.spec_from_module(module, record)
    params = sum(lin.weight.numel() for lin in spec.linears())
    assert ox.fp8_weight_bytes(model) == params + 1  # 1 byte per weight (+ the shared zero point)
    # the patch embedding stays in high precision: a float Conv straight on the pixels, no Q/DQ before it
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT and list(inits[conv.input[1]].dims) == [
        1280, 3, 14, 14]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[conv.input[0]] == "Cast"  # of the input pixels, not a DequantizeLinear
    for name, s in record.scales.items():
        base = name.replace(".", "/")
        assert float(onnx.numpy_helper.to_array(inits[base + "/weight_scale"])) == pytest.approx(s.weight_scale,
                                                                                                rel=1e-3)
        assert float(onnx.numpy_helper.to_array(inits[base + "/input_scale"])) == pytest.approx(s.input_scale,
                                                                                               rel=1e-3)
    # a text engine's key can never collide with a vision one's
    assert spec.kind == "vision" and spec.digest(torch.float32, True) != ox.spec_from_module(
        module, None).digest(torch.float32, True)


def test_onnxruntime_runs_the_vision_graph_like_the_pytorch_fp8_encoder(pack, vit_h4, fp8_cv):
    ox, runners = tr(pack, "onnx_export"), tr(pack, "runners")
    module, record = tower(pack, fp8_cv)
    ort = runners.OrtRunner(ox.export_transformer(module, record))
    px = pixels_of(vit_h4, images(3, seed=12))
    with torch.inference_mode():
        ref_last, ref_pen, ref_pooled = module(px, intermediate_output=-2)
        original = pack_module(pack, "quant.proxy").original_of(vit_h4.model.vision_model)
        orig_pooled = original(px, intermediate_output=-2)[2]
    last, hidden = ort(px)
    pooled = module.post_layernorm(last[:, 0])
    assert hidden.shape == (3, 4, 257, 1280) and torch.equal(hidden[:, -1], last)
    print(f"\nonnxruntime graph vs PyTorch FP8: pooled {cos_min(pooled, ref_pooled):.5f}, penultimate "
          f"{cos_min(hidden[:, -2], ref_pen):.5f}, last {cos_min(last, ref_last):.5f}; vs unquantized: pooled "
          f"{cos_min(pooled, orig_pooled):.5f}")
    assert cos_min(pooled, ref_pooled) >= 0.999
    assert cos_min(hidden[:, -2], ref_pen) >= 0.999 and cos_min(last, ref_last) >= 0.999
    # it computes the FP8 model, not the original: closer to the FP8 encoder than the FP8 encoder is to the original
    assert 1 - cos_min(pooled, ref_pooled) < 0.5 * (1 - cos_min(ref_pooled, orig_pooled))
    # dynamic batch: one image alone gives what it gave in the batch of 3
    last1, hidden1 = ort(px[1:2])
    assert last1.shape == (1, 257, 1280) and cos_min(hidden1, hidden[1:2]) > 0.9999


def test_vit_l_spec_reads_the_full_size_model(comfy, pack):
    """ViT-L/14 (24 layers, quick GELU) reads into the same export: shapes and activation come from the module."""
    ox = tr(pack, "onnx_export")
    (cv,) = call(comfy, "CLIPVisionLoader", clip_name=comfy.files["vit_l"])
    spec = ox.spec_from_module(cv.model.vision_model, None)
    assert (spec.kind, spec.width, spec.heads, len(spec.blocks), spec.activation) == (
        "vision", 1024, 16, 24, "quick_gelu")
    assert [t.to_dict() for t in spec.io()] == [t.to_dict() for t in ox.io_contract(1024, 24, 257, PIXELS)]
    with pytest.raises(ValueError, match="only CLIP text and vision encoders can be exported"):
        ox.spec_from_module(torch.nn.Linear(2, 2), None)


# --- real TensorRT builds ----------------------------------------------------------------------------------

def test_real_vision_engine_is_fp8_sized_with_a_dynamic_image_batch(pack, fp8_cv, rtx):
    ox, build = tr(pack, "onnx_export"), tr(pack, "build")
    module, record = tower(pack, fp8_cv)
    profile = build.Profile(max_rows=4, opt_rows=1)
    fp8 = build.build_engine(ox.export_transformer(module, record), profile, rtx.flavour, target=rtx.target)
    fp16 = build.build_engine(ox.build_onnx(ox.spec_from_module(module, None), compute_dtype=torch.float16,
                                            fp8=False), profile, rtx.flavour, target=rtx.target)
    mb = 2 ** 20
    params = sum(lin.weight.numel() for lin in ox.spec_from_module(module, None).linears())
    print(f"\nvision engines (ViT-H/14, 4 layers): FP8 {len(fp8.engine) / mb:.1f} MB, FP16 "
          f"{len(fp16.engine) / mb:.1f} MB; {params / 1e6:.1f}M Linear weights; build {fp8.build_seconds:.1f} s")
    assert len(fp8.engine) < 0.65 * len(fp16.engine)
    assert len(fp8.engine) < 0.6 * params * 2 < len(fp16.engine)  # FP8 weights in one, fp16 in the other
    assert [(t.name, t.mode, t.dtype, t.shape) for t in fp8.plan] == [
        ("pixel_values", "input", "float32", (-1, *PIXELS)), ("last_hidden", "output", "float32", (-1, 257, 1280)),
        ("hidden_states", "output", "float32", (-1, 4, 257, 1280))]


# --- the node ------------------------------------------------------------------------------------------------

def test_node_on_a_machine_without_cuda_says_why_and_returns_the_input(comfy, fp8_cv):
    out, status = call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=fp8_cv, max_images=4)
    assert out is fp8_cv
    assert status.startswith("TensorRT engine not used:") and "not a CUDA GPU" in status
    assert "CLIP_VISION keeps running in PyTorch" in status


def test_node_needs_a_quantized_clip_vision(comfy, vit_h4):
    with pytest.raises(ValueError, match=r"This CLIP_VISION is not quantized by this pack.*'Quantize CLIP Vision "
                                         r"to FP8 \(calibrated\)'"):
        call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=vit_h4, max_images=4)


def test_engine_clip_vision_encodes_like_the_pytorch_fp8_one(comfy, pack, vit_h4, fp8_cv, engine_node):
    import shutil

    shutil.rmtree(comfy.base / "models" / "tensorrt", ignore_errors=True)
    out, status = call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=fp8_cv, max_images=4)
    assert out is not fp8_cv and len(engine_node) == 1 and "built in" in status
    assert "1 to 4 images" in status and "vision_model:" in status
    (engine,) = sorted((comfy.base / "models" / "tensorrt").glob("fp8clip-vision_model-*.engine"))
    manifest = json.loads(engine.with_suffix(".json").read_text())
    assert manifest["components"]["profile"] == {"min_rows": 1, "opt_rows": 1, "max_rows": 4}
    assert manifest["source"]["kind"] == "vision" and manifest["source"]["fp8_layers"] == 24
    assert manifest["io"][0] == {"name": "pixel_values", "mode": "input", "dtype": "float32",
                                 "shape": [-1, *PIXELS]}

    img = images(2, seed=21)
    ref, got = vision_encode(comfy, fp8_cv, img), vision_encode(comfy, out, img)
    for key, shape in (("image_embeds", (2, 1024)), ("penultimate_hidden_states", (2, 257, 1280)),
                       ("last_hidden_state", (2, 257, 1280))):
        assert got[key].shape == ref[key].shape == shape
    e, p = cos_min(got["image_embeds"], ref["image_embeds"]), cos_min(got["penultimate_hidden_states"],
                                                                       ref["penultimate_hidden_states"])
    print(f"\nengine CLIP_VISION vs PyTorch FP8 through CLIPVisionEncode: image_embeds {e:.5f}, penultimate {p:.5f}")
    assert e >= 0.999 and p >= 0.999
    assert cos_min(got["last_hidden_state"], ref["last_hidden_state"]) >= 0.999
    assert cos_min(got["image_embeds"], vision_encode(comfy, vit_h4, img)["image_embeds"]) > 0.98
    # the input CLIP_VISION is untouched, still on the PyTorch FP8 runtime
    assert type(tower(pack, fp8_cv)[0]).__name__ == "FP8VisionModel"
    em = tower(pack, out)[0]
    assert type(em).__name__ == "EngineVisionModel"
    # ComfyUI budgets the engine plus the torch layers beside it (post_layernorm; the visual projection outside
    # the tower), not the FP8 weights a second time
    torch_side = sum(t.nbytes for t in [*em.state_dict().values(), *out.model.visual_projection.state_dict().values()])
    assert out.patcher.model_size() == pytest.approx(em.runner.device_bytes() + torch_side, rel=0.01)

    # a batch over the profile names the limit and the fix; the second node run finds the engine
    with pytest.raises(ValueError, match=r"5 images, but the TensorRT engine was built for at most 4\. Raise "
                                         r"max_images on the 'Build TensorRT Engine for FP8 CLIP Vision' node"):
        vision_encode(comfy, out, images(5, seed=1))
    again, status2 = call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=fp8_cv, max_images=4)
    assert len(engine_node) == 1 and "found in the cache, no build" in status2

    # an engine CLIP_VISION is not quantized, or engined, twice
    with pytest.raises(ValueError, match="already quantized"):
        node(comfy, "FP8CLIPVisionQuantize").quantize(
            clip_vision=out, keep_high_precision="", method="max", quantize="weights+activations",
            min_cosine=0.9, images=images(1, seed=2))
    with pytest.raises(ValueError, match="already runs on a TensorRT engine"):
        call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=out, max_images=4)
    # nor saved as a model: the message names what to save
    with pytest.raises(ValueError, match="runs on a TensorRT engine, which cannot be saved.*goes into 'Build"):
        call(comfy, "FP8CLIPVisionSave", clip_vision=out, filename="fp8test/engine_cv", overwrite=False)


def test_engine_that_cannot_be_loaded_falls_back_to_pytorch(comfy, pack, fp8_cv, rtx, monkeypatch):
    """Everything says 'go', but TensorRT cannot load the engine: the real TrtRunner fails to deserialize it
    here (no CUDA driver). The workflow goes on, on the PyTorch path. (Uses the engine the test above cached.)"""
    av = tr(pack, "availability")
    forced = av.Support(True, "TensorRT for RTX on a GPU that is not there", rtx.flavour, rtx.target,
                        torch.device("cuda:0"))
    monkeypatch.setattr(av, "engine_support", lambda device=None, flavour=None: forced)
    out, status = call(comfy, "FP8CLIPVisionTensorRTEngine", clip_vision=fp8_cv, max_images=4)
    assert out is fp8_cv
    assert re.match(r"TensorRT engine not used: the engine \S+/fp8clip-vision_model-\w+\.engine is ready but could "
                    r"not be loaded", status)
    img = images(1, seed=5)
    assert torch.equal(vision_encode(comfy, out, img)["image_embeds"],
                       vision_encode(comfy, fp8_cv, img)["image_embeds"])


def test_quantize_vision_node_tensorrt_runtime_puts_the_model_on_an_engine_for_4_images(comfy, pack, vit_h4,
                                                                                         fp8_cv, engine_node):
    """The vision quantize node's `tensorrt` runtime: FP8, then an engine for up to 4 images (IP-Adapter and
    unCLIP encode one reference at a time), CLIPVisionEncode on it like on the PyTorch FP8 model."""
    with torch.inference_mode():
        out = node(comfy, "FP8CLIPVisionQuantize").quantize(
            clip_vision=vit_h4, keep_high_precision="*patch_embedding*", method="max",
            quantize="weights+activations", min_cosine=0.9, runtime="tensorrt", images=images(4, seed=8),
            evaluation_images=images(2, seed=9))
    cv, text = out["result"]
    assert "TensorRT engine: " in text and "1 to 4 images" in text and "vision_model:" in text
    assert type(tower(pack, cv)[0]).__name__ == "EngineVisionModel"
    img = images(2, seed=21)
    got, ref = vision_encode(comfy, cv, img), vision_encode(comfy, fp8_cv, img)
    assert cos_min(got["image_embeds"], ref["image_embeds"]) >= 0.999
