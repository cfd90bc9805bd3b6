"""Save FP8 CLIP Vision / Load FP8 CLIP Vision in a real ComfyUI: bit-exact reloads, the text towers' file
layout, stock Load CLIP Vision refusing the file instead of loading it wrong, and bad input."""
from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import call

NAME = "fp8test/vit_l_fp8.safetensors"
LAYER = "vision_model.encoder.layers.3.mlp.fc1"


def mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.quant.{name}")


def images(pack, n: int, seed: int) -> torch.Tensor:
    return mod(pack, "images").synthetic_images(n, seed=seed)[0]


@pytest.fixture(scope="module")
def cv(comfy):
    return call(comfy, "CLIPVisionLoader", clip_name=comfy.files["vit_l"])[0]


@pytest.fixture(scope="module")
def quantized(pack, cv):
    """(fake-quant CLIP_VISION, the same on the fp8 runtime), calibrated on a few images for speed."""
    recipe = mod(pack, "recipe").Recipe(keep=mod(pack, "vision").DEFAULT_VISION_KEEP, fp8_embedding=False)
    with torch.inference_mode():
        fake, _ = mod(pack, "vision").quantize_clip_vision(cv, images(pack, 4, seed=7), recipe,
                                                           held_out=images(pack, 2, seed=9))
        return fake, mod(pack, "runtime").to_fp8_runtime(fake, "auto")[0]


@pytest.fixture(scope="module")
def cv_dir(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("clip_vision")[0])


@pytest.fixture(scope="module")
def saved(comfy, quantized, cv_dir) -> Iterator[Path]:
    (info,) = call(comfy, "FP8CLIPVisionSave", clip_vision=quantized[1], filename="fp8test/vit_l_fp8", overwrite=False)
    path = cv_dir / NAME
    assert f"Saved {path}" in info
    yield path
    path.unlink(missing_ok=True)


def encode(comfy, cv, img):
    return call(comfy, "CLIPVisionEncode", clip_vision=cv, image=img, crop="center")[0]


def load(comfy, name: str, runtime: str = "fp8"):
    return call(comfy, "FP8CLIPVisionLoad", clip_name=name, runtime=runtime)


def test_reload_is_bit_identical_to_the_quantized_clip_vision(comfy, pack, quantized, saved):
    qcv = quantized[1]
    lcv, info = load(comfy, NAME)
    assert info.startswith("ViT-L/14, weights+activations, method 'max'") and "on 2 held-out images" in info
    img = images(pack, 3, seed=11)
    ref = encode(comfy, qcv, img)
    got = encode(comfy, lcv, img)
    for k in ("image_embeds", "penultimate_hidden_states", "last_hidden_state"):
        assert torch.equal(ref[k], got[k]), k
    (m, rec), = mod(pack, "artifact").quantized_towers(lcv).values()
    fp8 = [x for x in m.modules() if isinstance(x, mod(pack, "fp8_ops").FP8Linear)]
    assert len(fp8) == 144 and all(x.weight.dtype == torch.float8_e4m3fn for x in fp8)
    (_, qrec), = mod(pack, "artifact").quantized_towers(qcv).values()
    assert (rec.family, rec.tower, rec.kept, rec.recipe, rec.scales, rec.fingerprint) == \
        (qrec.family, qrec.tower, qrec.kept, qrec.recipe, qrec.scales, qrec.fingerprint)
    assert lcv.patcher.model_size() == qcv.patcher.model_size()


def test_file_uses_the_text_towers_layout_and_carries_the_metadata(pack, quantized, saved, cv_dir, comfy):
    (m, rec), = mod(pack, "artifact").quantized_towers(quantized[1]).values()
    with safe_open(str(saved), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        w, ws, xs = (f.get_tensor(LAYER + s) for s in (".weight", ".weight_scale", ".input_scale"))
        cq = f.get_tensor(LAYER + ".comfy_quant")
        proj, conv = f.get_tensor("visual_projection.weight"), f.get_tensor("vision_model.embeddings.patch_embedding.weight")
    assert w.dtype == torch.float8_e4m3fn and w.shape == (4096 * 1024,)  # flattened: stock loaders fail loudly
    assert ws.shape == xs.shape == () and float(ws) == rec.scales[LAYER[len("vision_model."):]].weight_scale
    assert float(xs) == rec.scales[LAYER[len("vision_model."):]].input_scale
    assert json.loads(bytes(cq.tolist())) == {"format": "float8_e4m3fn"}
    assert proj.shape == (768, 1024) and conv.shape == (1024, 3, 14, 14) and conv.dtype == torch.float16
    quant_layers = {k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant")}
    assert len(quant_layers) == 144 and set(json.loads(meta["_quantization_metadata"])["layers"]) == quant_layers
    assert meta["fp8clip.format"] == "2" and meta["fp8clip.tower"] == "vision_model"
    assert meta["fp8clip.family"] == "ViT-L/14" and "Load FP8 CLIP Vision" in meta["fp8clip.note"]
    assert json.loads(meta["fp8clip.kept"]) == ["embeddings.patch_embedding"]
    assert json.loads(meta["fp8clip.recipe"])["scope"] == "weights+activations"
    assert json.loads(meta["fp8clip.report"])["embed_cos"] == rec.report["embed_cos"]
    assert "image_embeds" in meta["fp8clip.report_text"]
    assert set(json.loads(meta["fp8clip.versions"])) >= {"comfyui-fp8-clip", "nvidia-modelopt", "torch"}
    assert saved.stat().st_size < 0.6 * os.path.getsize(cv_dir / comfy.files["vit_l"])


def test_stock_clip_vision_loader_refuses_the_file_instead_of_loading_it_wrong(comfy, saved):
    with pytest.raises(RuntimeError, match=r"size mismatch for vision_model\.encoder\.layers\.\d+\..*weight"):
        call(comfy, "CLIPVisionLoader", clip_name=NAME)


def test_load_node_runs_in_a_workflow(comfy, saved):
    from harness.host import run_graph

    prompt = {"1": {"class_type": "FP8CLIPVisionLoad", "inputs": {"clip_name": NAME, "runtime": "auto"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    text = run_graph(comfy, prompt)["2"]["text"][0]  # the saved report, from the file's header
    assert re.fullmatch(r"ViT-L/14, weights\+activations, method 'max'\ncosine vs the unquantized encoder on 2 "
                        r"held-out images \(min / mean\): image_embeds 0\.99\d\d / 0\.99\d\d, penultimate hidden "
                        r"states 0\.99\d\d / 0\.99\d\d", text), text


def test_load_runs_again_when_its_file_is_saved_again(comfy, saved, cv_dir, scratch):
    """As Load FP8 CLIP (test_save_load.py): a file saved again under its name is loaded again."""
    import time

    node = comfy.nodes.NODE_CLASS_MAPPINGS["FP8CLIPVisionLoad"]
    path = scratch(cv_dir / "fp8test" / "vit_l_again.safetensors")
    path.write_bytes(saved.read_bytes())
    before = node.IS_CHANGED("fp8test/vit_l_again.safetensors", runtime="auto")
    assert node.IS_CHANGED("fp8test/vit_l_again.safetensors", runtime="auto") == before
    time.sleep(0.01)
    path.write_bytes(saved.read_bytes())
    assert node.IS_CHANGED("fp8test/vit_l_again.safetensors", runtime="auto") != before


def test_saving_never_overwrites_unless_asked(comfy, quantized, saved, cv_dir, scratch):
    before = saved.read_bytes()[:4096], saved.stat().st_mtime_ns
    with pytest.raises(ValueError, match="vit_l_fp8.safetensors already exists.*set 'overwrite'"):
        call(comfy, "FP8CLIPVisionSave", clip_vision=quantized[1], filename="fp8test/vit_l_fp8", overwrite=False)
    assert (saved.read_bytes()[:4096], saved.stat().st_mtime_ns) == before
    # The fake-quant preview saves the same file as the fp8 runtime; overwrite replaces.
    copy = scratch(cv_dir / "fp8test" / "from_fake.safetensors")
    for overwrite in (False, True):
        call(comfy, "FP8CLIPVisionSave", clip_vision=quantized[0], filename="fp8test/from_fake", overwrite=overwrite)
    a, b = load_file(str(copy)), load_file(str(saved))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == torch.float8_e4m3fn
               else torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (cv_dir / "fp8test").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_saving_an_unquantized_clip_vision_is_refused(comfy, cv):
    with pytest.raises(ValueError, match="not quantized by this pack.*'Quantize CLIP Vision to FP8'"):
        call(comfy, "FP8CLIPVisionSave", clip_vision=cv, filename="fp8test/x", overwrite=False)


@pytest.mark.parametrize("name", ["../escaped", "fp8test/../../escaped", "/tmp/fp8clip-vescaped", "~/escaped"])
def test_names_that_escape_the_models_folder_are_refused(comfy, quantized, cv_dir, name):
    with pytest.raises(ValueError, match="outside the models folder"):
        call(comfy, "FP8CLIPVisionSave", clip_vision=quantized[1], filename=name, overwrite=True)
    assert not (cv_dir.parent / "escaped.safetensors").exists()
    with pytest.raises(ValueError, match="outside the models folder"):
        load(comfy, name + ".safetensors")


# --- text <-> vision, other model types, damaged files --------------------------------------------------------

@pytest.fixture(scope="module")
def text_fp8(comfy, pack) -> Iterator[Path]:
    """An FP8 CLIP-L text file saved by this pack (calibrated on two prompts: only its kind matters here)."""
    (clip,) = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")
    with torch.inference_mode():
        fake, _ = mod(pack, "calibrate").quantize_clip(clip, ["a cat", "a dog"], mod(pack, "recipe").Recipe(),
                                                       held_out=["a house"])
    te = Path(comfy.folder_paths.get_folder_paths("text_encoders")[0])
    path = mod(pack, "serialize").save_fp8_clip(fake, te, "fp8test/vtest_clip_l", overwrite=True)[0]
    yield path
    path.unlink(missing_ok=True)


def linked(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)  # scratch() deletes it when the test ends
    return dst.name


def test_a_text_file_given_to_the_vision_loader_is_refused(comfy, text_fp8, cv_dir, scratch):
    name = linked(text_fp8, scratch(cv_dir / "fp8test" / "text-fp8.safetensors"))
    with pytest.raises(ValueError, match=r"FP8 CLIP text encoder \(clip_l\), not a CLIP vision model; load it "
                                         r"with 'Load FP8 CLIP'"):
        load(comfy, "fp8test/" + name)
    stock = comfy.base / "models" / "text_encoders" / comfy.files["clip_l"]
    name = linked(stock, scratch(cv_dir / "fp8test" / "text-stock.safetensors"))
    with pytest.raises(ValueError, match="is a CLIP text encoder, not a CLIP vision model. Load it with 'Load CLIP'"):
        load(comfy, "fp8test/" + name)


def test_a_vision_file_given_to_the_text_loader_is_refused(comfy, saved, scratch):
    te = Path(comfy.folder_paths.get_folder_paths("text_encoders")[0])
    linked(saved, scratch(te / "fp8test" / "vision-fp8.safetensors"))
    with pytest.raises(ValueError, match="is an FP8 CLIP vision model; load it with 'Load FP8 CLIP Vision'"):
        call(comfy, "FP8CLIPLoad", clip_name="fp8test/vision-fp8.safetensors", type="auto", runtime="auto")


def test_an_ordinary_clip_vision_file_is_refused_with_the_reason(comfy):
    with pytest.raises(ValueError, match="ordinary CLIP vision model.*'Quantize CLIP Vision to FP8'"):
        load(comfy, comfy.files["vit_l"])


def rewrite(src: Path, dst: Path, drop=(), meta_update=None, meta_drop=(), add=None) -> str:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_update or {})
    meta = {k: v for k, v in meta.items() if k not in meta_drop}
    tensors = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    save_file({**tensors, **(add or {})}, str(dst), metadata=meta)
    return "fp8test/" + dst.name


def test_truncated_file(comfy, saved, cv_dir, scratch):
    scratch(cv_dir / "fp8test" / "truncated.safetensors").write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(comfy, "fp8test/truncated.safetensors")


def test_missing_scales(comfy, saved, cv_dir, scratch):
    name = rewrite(saved, scratch(cv_dir / "fp8test" / "no-scale.safetensors"), drop=[LAYER + ".weight_scale"])
    with pytest.raises(ValueError, match=f"layer {LAYER} is stored in FP8 but its weight_scale is missing"):
        load(comfy, name)
    name = rewrite(saved, scratch(cv_dir / "fp8test" / "no-input-scale.safetensors"), drop=[LAYER + ".input_scale"])
    with pytest.raises(ValueError, match=f"layer {LAYER} was calibrated for FP8 activations but its input_scale"):
        load(comfy, name)


def test_a_file_missing_a_part_of_the_model_is_refused(comfy, saved, cv_dir, scratch):
    name = rewrite(saved, scratch(cv_dir / "fp8test" / "no-projection.safetensors"), drop=["visual_projection.weight"])
    with pytest.raises(ValueError, match=r"no-projection\.safetensors: its data does not match the checksum"):
        load(comfy, name)
    # a file saved before the checksum: the model check names the part
    name = rewrite(saved, scratch(cv_dir / "fp8test" / "no-projection-old.safetensors"),
                   drop=["visual_projection.weight"], meta_drop=["fp8clip.sha256"])
    with pytest.raises(ValueError, match=r"does not match the (vision )?model ComfyUI detected.*visual_projection"):
        load(comfy, name)


def test_a_scale_outside_the_vision_tower_is_refused_not_dropped(comfy, saved, cv_dir, scratch):
    """The vision loader dropped scale tensors outside vision_model. (the text loader refuses any stray key);
    an FP8 layer there would have been dequantized with its scale under a garbled layer name. Files without the
    checksum (saved before it) reach this check."""
    name = rewrite(saved, scratch(cv_dir / "fp8test" / "stray-scale.safetensors"), meta_drop=["fp8clip.sha256"],
                   add={"visual_projection.weight_scale": torch.tensor(0.01)})
    with pytest.raises(ValueError, match=r"visual_projection\.weight_scale is FP8 data outside the vision tower"):
        load(comfy, name)


def test_a_stock_compatible_text_export_in_the_vision_loader_is_named_a_text_encoder(pack, tmp_path):
    """An FP8 text export (stock-compatible) in the vision loader was 'quantized weights ... load it with ComfyUI's
    own loader': the fix is 'Load CLIP', whatever the weights' format (found by review)."""
    ff = mod(pack, "fileformat")
    p = tmp_path / "clip_l_stock.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
               "text_model.final_layer_norm.weight": torch.ones(4, dtype=torch.float16)}, str(p),
              metadata={ff.H_STOCK: "{}"})
    with pytest.raises(ValueError, match="is a quantized CLIP text encoder, not a CLIP vision model. Load it with "
                                         "'Load CLIP'"):
        ff.read_tower_file(p, ff.VISION_TOWERS)
