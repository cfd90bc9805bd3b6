"""CLIP vision (IP-Adapter / unCLIP image encoders) quantized in a real ComfyUI, used by stock nodes."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from conftest import call, fp8_conversions_when_cancelled, node, pack_module, record_tower_loads_and_folds

PARAMS = dict(keep_high_precision="*patch_embedding*", method="max", quantize="weights+activations",
              min_cosine=0.99, runtime="auto")


def images(n: int, seed: int):
    import importlib
    return importlib.import_module("quant.images").synthetic_images(n, seed=seed)[0]


def quantize_vision(comfy, cv, **kw):
    n = node(comfy, "FP8CLIPVisionQuantize")
    with torch.inference_mode():
        return n.quantize(clip_vision=cv, **{**PARAMS, **kw})


@pytest.fixture(scope="module")
def vit_l(comfy):
    return call(comfy, "CLIPVisionLoader", clip_name=comfy.files["vit_l"])[0]


@pytest.fixture(scope="module")
def fp8_vit_l(comfy, vit_l):
    # Full size, few images: each ViT-L batch costs seconds on this CPU (the smaller ViT-H tests vary the rest).
    out = quantize_vision(comfy, vit_l, images=images(4, seed=7), evaluation_images=images(4, seed=9))
    return out["result"]


def vision_encode(comfy, cv, img):
    return call(comfy, "CLIPVisionEncode", clip_vision=cv, image=img, crop="center")[0]


def test_vit_l_report_and_clipvisionencode(comfy, vit_l, fp8_vit_l):
    q, report = fp8_vit_l
    print("\n" + report)
    assert report.startswith("FP8 E4M3 CLIP vision quality report: ViT-L/14")
    assert "144 Linear layers in FP8; kept in high precision: vision_model.embeddings.patch_embedding" in report
    emin = float(re.search(r"image_embeds\s+([\d.]+)", report).group(1))
    assert 0.98 < emin < 1.0
    assert re.search(r"FP8 agrees with the original on \d+/4 images", report)
    assert "Runtime: fp8" in report
    img = images(2, seed=11)
    ref, got = vision_encode(comfy, vit_l, img), vision_encode(comfy, q, img)
    assert got["image_embeds"].shape == ref["image_embeds"].shape == (2, 768)
    assert got["penultimate_hidden_states"].shape == ref["penultimate_hidden_states"].shape == (2, 257, 1024)
    assert float(torch.nn.functional.cosine_similarity(ref["image_embeds"], got["image_embeds"]).min()) > 0.98
    # the input CLIP_VISION is untouched
    assert torch.equal(vision_encode(comfy, vit_l, img)["image_embeds"], ref["image_embeds"])


def test_fp8_vision_output_feeds_unclip_conditioning(comfy, vit_l, fp8_vit_l):
    q, _ = fp8_vit_l
    img = images(1, seed=3)
    out = vision_encode(comfy, q, img)
    (clip,) = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")
    (cond,) = call(comfy, "CLIPTextEncode", clip=clip, text="a photo")
    (uncond,) = call(comfy, "unCLIPConditioning", conditioning=cond, clip_vision_output=out, strength=1.0,
                     noise_augmentation=0.0)
    # what an unCLIP model reads from it (comfy.model_base.unclip_adm: the output's image_embeds attribute)
    embeds = uncond[0][1]["unclip_conditioning"][0]["clip_vision_output"].image_embeds
    ref = vision_encode(comfy, vit_l, img)["image_embeds"]
    assert embeds.shape == ref.shape == (1, 768)
    assert float(torch.nn.functional.cosine_similarity(embeds, ref).min()) > 0.98


@pytest.fixture(scope="module")
def vit_h4(comfy, tmp_path_factory):
    """ViT-H/14's width, heads and GELU (4 of its 32 layers, through ComfyUI's own ClipVisionModel)."""
    from comfy.clip_vision import ClipVisionModel
    from comfy.utils import load_torch_file

    cfg = json.loads((comfy.host / "comfy" / "clip_vision_config_h.json").read_text())
    cfg["num_hidden_layers"] = 4
    p = tmp_path_factory.mktemp("vit_h4") / "h4.json"
    p.write_text(json.dumps(cfg))
    cv = ClipVisionModel(str(p))
    sd = load_torch_file(str(comfy.base / "models" / "clip_vision_reduced" / comfy.files["vit_h_4layers"]))
    cv.load_sd(sd)
    return cv


def test_vit_h_reduced_depth(comfy, vit_h4):
    cv = vit_h4
    q, report = quantize_vision(comfy, cv, images=images(4, seed=8), evaluation_images=images(4, seed=9))["result"]
    assert "24 Linear layers in FP8" in report
    img = images(2, seed=12)
    ref, got = vision_encode(comfy, cv, img), vision_encode(comfy, q, img)
    assert got["image_embeds"].shape == (2, 1024)
    assert float(torch.nn.functional.cosine_similarity(ref["image_embeds"], got["image_embeds"]).min()) > 0.98


def test_weights_only_encodes_no_image_to_calibrate(comfy, pack, vit_h4, monkeypatch):
    """As for text: 'weights only' takes its scales from the weights, so only the report's images are encoded
    (10 prototypes and the evaluation images through the original, the evaluation images through the FP8 copy),
    and other calibration images do not quantize again."""
    from comfy.clip_vision import ClipVisionModel

    seen = []
    real = ClipVisionModel.encode_image
    monkeypatch.setattr(ClipVisionModel, "encode_image",
                        lambda self, img, *a, **k: (seen.append(img.shape[0]), real(self, img, *a, **k))[1])
    pack_module(pack, "quant.calibration_memo").forget_all()
    kw = dict(evaluation_images=images(4, seed=9), quantize="weights only", runtime="fake-quant")
    q, report = quantize_vision(comfy, vit_h4, images=images(8, seed=8), **kw)["result"]
    assert sum(seen) == 10 + 4 + 4, seen
    assert "Calibration: no images (weights only: scales from the weights)" in report
    record = pack_module(pack, "quant.artifact").record_of(q.patcher.get_model_object("vision_model"))
    assert record.scales and all(s.input_scale is None for s in record.scales.values())
    seen.clear()
    again = quantize_vision(comfy, vit_h4, images=images(4, seed=5), **kw)["result"]
    assert sum(seen) == 0 and "reused from" in again[1]


def test_changing_only_the_runtime_or_threshold_does_not_calibrate_again(comfy, pack, vit_h4, monkeypatch):
    """As for text (test_quantize_clip.py): a new runtime or min_cosine reuses the calibration and report, and the
    model is that of the fresh calibration; other calibration images calibrate again."""
    vision = pack_module(pack, "quant.vision")
    calls = []
    real = vision.LayerErrorProbe  # built once per calibration, for the report's per-layer errors
    monkeypatch.setattr(vision, "LayerErrorProbe", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cal, test, img = images(4, seed=8), images(4, seed=9), images(2, seed=12)
    first = quantize_vision(comfy, vit_h4, images=cal, evaluation_images=test, runtime="fake-quant")["result"]
    want = vision_encode(comfy, first[0], img)["penultimate_hidden_states"]
    events = record_tower_loads_and_folds(pack, monkeypatch)
    again = quantize_vision(comfy, vit_h4, images=cal, evaluation_images=test, runtime="fake-quant",
                            min_cosine=0.5)["result"]
    assert len(calls) == 1 and "Calibration and report reused from the run at" in again[1]
    assert events[:2] == ["load", "fold"]  # rebuilt on the GPU (ViT-H on the CPU: seconds)
    assert torch.equal(vision_encode(comfy, again[0], img)["penultimate_hidden_states"], want)
    assert again[1].split("\nCalibration: ")[1] .startswith(first[1].split("\nCalibration: ")[1].split("\n")[0])
    quantize_vision(comfy, vit_h4, images=images(4, seed=10), evaluation_images=test, runtime="fake-quant")
    assert len(calls) == 2


def test_cancel_while_a_remembered_calibration_is_rebuilt_stops_the_node(comfy, pack, vit_h4, monkeypatch):
    """The reuse path of a ViT-H takes seconds (copy, quantizers, FP8 conversion: 10 s through ComfyUI's server
    on an H200, bench/results/http_server_gpu.md) that the cancel button must cut short, before the FP8
    conversion; the memo survives."""
    cal, test = images(4, seed=8), images(4, seed=9)
    quantize_vision(comfy, vit_h4, images=cal, evaluation_images=test, runtime="fake-quant")
    run = lambda: quantize_vision(comfy, vit_h4, images=cal, evaluation_images=test, runtime="auto")  # noqa: E731
    assert fp8_conversions_when_cancelled(pack, monkeypatch, run) == 0
    again = quantize_vision(comfy, vit_h4, images=cal, evaluation_images=test, runtime="fake-quant")["result"][1]
    assert "Calibration and report reused from the run at" in again


@pytest.mark.parametrize("bad, msg", [
    (torch.rand(2, 64, 64, 2), "have 2 channels"),
    (torch.rand(64, 64, 3), r"must be an IMAGE batch \[batch, height, width, channels\]"),
    (torch.rand(1, 8, 8, 3), "use images of at least 16x16"),
])
def test_bad_calibration_images(comfy, vit_l, bad, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_vision(comfy, vit_l, images=bad)
    with pytest.raises(ValueError, match=msg.replace("calibration", "evaluation")):
        quantize_vision(comfy, vit_l, images=images(2, seed=1), evaluation_images=bad)


def test_grayscale_and_rgba_calibration_images_are_accepted(pack):
    import importlib
    check = importlib.import_module(f"{pack.__name__}.quant.images").check_images
    gray, rgba = torch.rand(2, 40, 50, 1), torch.rand(2, 40, 50, 4)
    assert torch.equal(check(gray), gray.expand(2, 40, 50, 3))  # gray in each channel, as CLIPVisionEncode does
    assert torch.equal(check(rgba), rgba[..., :3])  # alpha dropped


@pytest.mark.parametrize("config", ["clip_vision_siglip_384.json", "image_encoders/dino2_large.json"])
def test_unknown_image_encoder_is_refused(comfy, tmp_path, config):
    """SigLIP (Flux Redux) and DINOv2 (Hunyuan3D), which Load CLIP Vision loads too; DINOv2, which has no
    vision_model, raised a bare AttributeError."""
    from comfy.clip_vision import ClipVisionModel

    cfg = json.loads((comfy.host / "comfy" / config).read_text())
    cfg["num_hidden_layers"] = 1
    p = tmp_path / "encoder.json"
    p.write_text(json.dumps(cfg))
    cv = ClipVisionModel(str(p))
    with pytest.raises(ValueError, match=r"not a CLIP vision transformer the pack knows\. Supported: CLIP vision.*"
                                         r"not SigLIP encoders such as Flux Redux's"):
        quantize_vision(comfy, cv)


def test_keeping_every_layer_is_refused_with_the_fix(comfy, vit_h4):
    with pytest.raises(ValueError, match=r"Nothing to quantize in this model: the keep_high_precision patterns "
                                         r"\(\*\) match all 24 of its Linear layers\. Remove the pattern.*"
                                         r"the default keeps only the patch embedding"):  # not text towers' advice
        quantize_vision(comfy, vit_h4, keep_high_precision="*", images=images(2, seed=1))


def test_a_device_without_float8_tensors_is_refused_with_the_fix(comfy, vit_h4):
    on_mps = copy.copy(vit_h4)
    on_mps.patcher = vit_h4.patcher.clone()
    on_mps.patcher.load_device = torch.device("mps")
    with pytest.raises(ValueError, match=r"ComfyUI runs this CLIP vision model on mps, and Apple GPUs \(MPS\) "
                                         r"cannot hold .* start ComfyUI without --gpu-only"):
        quantize_vision(comfy, on_mps)


def test_report_warns_on_the_hidden_states_ip_adapter_uses_and_on_shared_evaluation_images(pack, vit_h4):
    """The threshold covers the penultimate hidden states (IP-Adapter's input), not only image_embeds; evaluation
    images that are calibration images are named; the calibration's fingerprint follows its pixels."""
    import dataclasses

    vision = pack_module(pack, "quant.vision")
    recipe = pack_module(pack, "quant.recipe").Recipe(keep=("*patch_embedding*",))
    cal = images(4, seed=8)
    with torch.inference_mode():
        q, report = vision.quantize_clip_vision(vit_h4, cal, recipe, held_out=images(4, seed=9))
        q2, shared = vision.quantize_clip_vision(vit_h4, torch.rand_like(cal), recipe, held_out=cal[:3])
    assert not report.warnings() and report.overlap == 0
    low = dataclasses.replace(report, min_cosine=min(report.hidden_cos) + 1e-6).warnings()
    assert len(low) == 1 and f"penultimate hidden states {min(report.hidden_cos):.5f}" in low[0]
    assert shared.overlap == 0
    with torch.inference_mode():
        _, again = vision.quantize_clip_vision(vit_h4, cal, recipe, held_out=torch.cat([cal[1:3], images(1, seed=5)]))
    assert again.overlap == 2 and "2 of the 3 evaluation images are calibration images too" in again.warnings()[0]
    record = pack_module(pack, "quant.artifact").record_of
    fps = [record(m.patcher.get_model_object("vision_model")).fingerprint for m in (q, q2)]
    assert fps[0] != fps[1]  # same shape, other pixels


class ImageList:
    """Stands in for folder loaders, whose images come as a list of batches of their own sizes:
    'WxHxN,...' (synthetic images)."""
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_IS_LIST = "tests", "run", ("IMAGE",), (True,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sizes": ("STRING", {"default": ""}), "seed": ("INT", {"default": 0})}}

    def run(self, sizes, seed):
        import importlib
        synthetic = importlib.import_module("quant.images").synthetic_images
        out = []
        for i, spec in enumerate(sizes.split(",")):
            w, h, n = map(int, spec.split("x"))
            out.append(synthetic(n, seed=seed + i, size=max(w, h))[0][:, :h, :w])
        return (out,)


def test_an_image_list_wired_in_calibrates_once_on_all_its_images(comfy, vit_h4, monkeypatch):
    """ComfyUI runs a node once per item of a list input: a folder of images of several sizes would have
    calibrated once per image and handed out as many models."""
    from harness.host import run_graph

    class TheModel:  # hands this test's ViT-H/14 (4 layers; no loader reads that config) to the graph
        CATEGORY, FUNCTION, RETURN_TYPES = "tests", "run", ("CLIP_VISION",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (vit_h4,)

    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "TestCLIPVision", TheModel)
    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "TestImageList", ImageList)
    prompt = {"1": {"class_type": "TestCLIPVision", "inputs": {}},
              "2": {"class_type": "TestImageList", "inputs": {"sizes": "64x64x2,96x48x1,224x224x1", "seed": 8}},
              "3": {"class_type": "TestImageList", "inputs": {"sizes": "64x64x1,80x80x1", "seed": 9}},
              "4": {"class_type": "FP8CLIPVisionQuantize", "inputs": {
                  **PARAMS, "runtime": "fake-quant", "clip_vision": ["1", 0], "images": ["2", 0],
                  "evaluation_images": ["3", 0]}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}}
    (report,) = run_graph(comfy, prompt)["4"]["text"]
    assert "Calibration: 4 images" in report and "on 2 held-out images" in report


def test_images_of_several_sizes_calibrate_on_what_the_encoder_sees(comfy, pack, vit_h4):
    """A list's batches of several sizes are joined after the encoder's own scale and center crop: each image
    encodes as it does alone."""
    one_batch = pack_module(pack, "quant.images").one_batch
    parts = ImageList().run("64x64x2,96x48x1,300x200x1", seed=3)[0]
    joined = one_batch(parts, vit_h4.image_size)
    assert joined.shape == (4, 224, 224, 3)
    with torch.inference_mode():
        alone = torch.cat([vit_h4.encode_image(p, crop=True)["image_embeds"] for p in parts])
        together = vit_h4.encode_image(joined, crop=True)["image_embeds"]
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
    same = [images(2, seed=1), images(1, seed=2)]  # one size: joined as they are
    assert torch.equal(one_batch(same, 224), torch.cat(same))
    with pytest.raises(ValueError, match="The list of calibration images is empty"):
        one_batch([], 224)
    # a script calling the node's FUNCTION with plain values, as before it took lists
    with pytest.raises(ValueError, match="have 2 channels"):
        node(comfy, "FP8CLIPVisionQuantize").quantize_lists(clip_vision=vit_h4, images=torch.rand(2, 64, 64, 2),
                                                            **PARAMS)
