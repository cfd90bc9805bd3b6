"""Save FP8 CLIP / Load FP8 CLIP in a real ComfyUI: bit-exact reloads, ComfyUI's quantized layout, stock loaders
that refuse the file instead of loading it wrong, the stock-compatible export, and every bad input."""
from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import call, cosine, encode, pack_module

CAL = "a cat\na dog on a beach\n(a red car:1.2)"
EVAL = "a house by a lake\na portrait of a woman, oil painting"
PROMPTS = ("a photo of a dog running on the beach",
           "(masterpiece:1.3), a phoenix rising from flames, (vivid colors:1.2)",
           ", ".join(f"detail {i}" for i in range(60)))


def mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.quant.{name}")


@pytest.fixture(scope="module")
def clip(comfy):
    return call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")[0]


@pytest.fixture(scope="module")
def quantized(pack, clip):
    """(fake-quant CLIP, what the quantize node returns with runtime auto), on short prompt sets for speed."""
    with torch.inference_mode():
        fake, _ = mod(pack, "calibrate").quantize_clip(clip, CAL.splitlines(), mod(pack, "recipe").Recipe(),
                                                       held_out=EVAL.splitlines())
        return fake, mod(pack, "runtime").to_fp8_runtime(fake, "auto")[0]


@pytest.fixture(scope="module")
def qclip(quantized):
    return quantized[1]


@pytest.fixture(scope="module")
def te_dir(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("text_encoders")[0])


@pytest.fixture(scope="module")
def saved(comfy, qclip, te_dir) -> Iterator[Path]:
    (info,) = call(comfy, "FP8CLIPSave", clip=qclip, filename="fp8test/clip_l_fp8",
                   format="fp8 + scales (Load FP8 CLIP)", overwrite=False)
    path = te_dir / "fp8test" / "clip_l_fp8.safetensors"
    assert f"Saved {path}" in info
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def loaded(comfy, saved):
    clip, info = call(comfy, "FP8CLIPLoad", clip_name="fp8test/clip_l_fp8.safetensors", type="auto", runtime="auto")
    return clip, info


def rewrite(src: Path, dst: Path, drop=(), meta_update=None, replace=None, meta_drop=()) -> Path:
    """A copy of a saved file with tensors dropped or replaced, or header entries changed (what damage or an
    edit does)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = {k: v for k, v in load_file(str(src)).items() if not (drop(k) if callable(drop) else k in drop)}
    tensors.update(replace or {})
    meta.update(meta_update or {})
    meta = {k: v for k, v in meta.items() if k not in meta_drop}
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_reload_is_bit_identical_to_the_quantized_clip(comfy, pack, qclip, loaded):
    lclip, info = loaded
    assert "clip_l: SD1.5 (CLIP-L), weights+activations" in info
    emb = comfy.files["embedding"].rsplit(".", 1)[0]
    (q_skip,) = call(comfy, "CLIPSetLastLayer", clip=qclip, stop_at_clip_layer=-2)
    (l_skip,) = call(comfy, "CLIPSetLastLayer", clip=lclip, stop_at_clip_layer=-2)
    cases = [(qclip, lclip, p) for p in PROMPTS] + [(qclip, lclip, f"a portrait, embedding:{emb}"),
                                                    (q_skip, l_skip, PROMPTS[0])]
    ref = [encode(comfy, a, text) for a, _, text in cases]  # one CLIP after the other: fewer model swaps
    for (qc, qp), (_, b, text) in zip(ref, cases):
        lc, lp = encode(comfy, b, text)
        assert torch.equal(qc, lc) and torch.equal(qp, lp), text
    (m, rec), = mod(pack, "artifact").quantized_towers(lclip).values()
    fp8 = [x for x in m.modules() if isinstance(x, mod(pack, "fp8_ops").FP8Linear)]
    assert len(fp8) == 72 and all(x.weight.dtype == torch.float8_e4m3fn for x in fp8)
    assert lclip.patcher.model_size() == qclip.patcher.model_size()
    (_, qrec), = mod(pack, "artifact").quantized_towers(qclip).values()
    assert (rec.fingerprint, rec.kept, rec.recipe, rec.scales) == (qrec.fingerprint, qrec.kept, qrec.recipe, qrec.scales)


def test_loading_onto_a_device_without_float8_tensors_is_refused_at_once(pack, saved):
    """It loaded, then failed at the first encode with PyTorch's message (Apple MPS under --gpu-only)."""
    with pytest.raises(ValueError, match=r"runs this CLIP on mps, and Apple GPUs \(MPS\) cannot hold"):
        mod(pack, "serialize").load_fp8_clip([saved], model_options={"load_device": torch.device("mps")})


def test_file_uses_comfyui_quantized_layout_and_carries_the_metadata(pack, qclip, saved):
    (m, rec), = mod(pack, "artifact").quantized_towers(qclip).values()
    layer = "text_model.encoder.layers.3.mlp.fc1"
    with safe_open(str(saved), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        w, ws, xs = f.get_tensor(layer + ".weight"), f.get_tensor(layer + ".weight_scale"), f.get_tensor(layer + ".input_scale")
        cq = f.get_tensor(layer + ".comfy_quant")
        kept = f.get_tensor("text_projection.weight")
    assert w.dtype == torch.float8_e4m3fn and w.shape == (3072 * 768,)  # flattened: see the stock-loader test
    assert ws.shape == xs.shape == () and ws.dtype == xs.dtype == torch.float32
    assert json.loads(bytes(cq.tolist())) == {"format": "float8_e4m3fn"}
    lin = m.get_submodule(layer)
    assert torch.equal(w.reshape(3072, 768).view(torch.uint8), lin.weight.cpu().view(torch.uint8))
    assert float(ws) == float(lin.weight_scale) == rec.scales[layer].weight_scale
    assert float(xs) == rec.scales[layer].input_scale
    # the multiplier ModelOpt quantized inputs with, to the ulp: 448 / amax, not 1 / input_scale
    assert float(load_file(str(saved))[layer + ".input_scale_inv"]) == rec.scales[layer].input_scale_inv
    assert kept.dtype == torch.float16 and kept.shape == (768, 768)
    quant_layers = {k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant")}
    assert len(quant_layers) == 72 and "text_projection" not in quant_layers
    assert set(json.loads(meta["_quantization_metadata"])["layers"]) == quant_layers
    assert meta["fp8clip.format"] == "2" and meta["fp8clip.tower"] == "clip_l"
    assert meta["fp8clip.family"] == "SD1.5 (CLIP-L)" and json.loads(meta["fp8clip.kept"]) == ["text_projection"]
    assert meta["fp8clip.fingerprint"] == rec.fingerprint
    assert json.loads(meta["fp8clip.recipe"])["scope"] == "weights+activations"
    assert json.loads(meta["fp8clip.report"])["cond_min"] == rec.report["cond_min"]
    assert set(json.loads(meta["fp8clip.versions"])) >= {"comfyui-fp8-clip", "nvidia-modelopt", "torch", "comfyui"}
    assert json.loads(meta["fp8clip.bundle"])["clip_type"] == "stable_diffusion"
    assert saved.stat().st_size < 0.55 * os.path.getsize(saved.parent.parent / "fp8clip-fixture-clip_l.safetensors")


@pytest.mark.parametrize("loader", ["CLIPLoader/stable_diffusion", "CLIPLoader/sd3", "DualCLIPLoader/sdxl",
                                    "CheckpointLoaderSimple"])
def test_stock_loaders_refuse_the_file_instead_of_loading_it_wrong(comfy, saved, loader):
    name = "fp8test/clip_l_fp8.safetensors"
    if loader == "CheckpointLoaderSimple":
        dst = comfy.base / "models" / "checkpoints" / "fp8test-clip_l_fp8.safetensors"
        if not dst.exists():
            os.link(saved, dst)
        with pytest.raises(RuntimeError, match="Could not detect model type"):
            call(comfy, loader, ckpt_name=dst.name)
        return
    node, ctype = loader.split("/")
    args = (dict(clip_name=name, type=ctype) if node == "CLIPLoader"
            else dict(clip_name1=name, clip_name2=comfy.files.get("clip_g", name), type=ctype))
    with pytest.raises(RuntimeError, match=r"size mismatch for text_model\.(encoder|embeddings)\..*weight"):
        call(comfy, node, **args)


def test_stock_loader_error_reaches_the_ui(comfy, saved):
    from harness.host import run_graph

    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "fp8test/clip_l_fp8.safetensors",
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a cat"}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    with pytest.raises(RuntimeError, match="size mismatch"):
        run_graph(comfy, prompt)


def test_load_node_runs_in_a_workflow(comfy, saved):
    from harness.host import run_graph

    prompt = {"1": {"class_type": "FP8CLIPLoad", "inputs": {"clip_name": "fp8test/clip_l_fp8.safetensors",
                                                            "type": "auto", "runtime": "fp8"}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    out = run_graph(comfy, prompt)
    # the saved quality report, as the Load node shows it (from the file's header; the two held-out prompts)
    assert re.fullmatch(r"clip_l: SD1\.5 \(CLIP-L\), weights\+activations, method 'max'\ncosine vs the unquantized "
                        r"encoder on 2 held-out prompts \(min / mean\): conditioning 0\.99\d\d / 0\.99\d\d, pooled "
                        r"0\.9\d{3} / 0\.9\d{3}", out["3"]["text"][0]), out["3"]["text"][0]


def test_stock_compatible_export_is_read_correctly_by_stock_and_its_quality_is_measured(comfy, pack, clip, te_dir, scratch):
    held_out = list(PROMPTS) + ["a cat"]
    path = scratch(te_dir / "fp8test" / "clip_l_stock.safetensors")
    (info,) = call(comfy, "FP8CLIPSave", clip=clip, filename="fp8test/clip_l_stock",
                   format="stock-compatible (weights-only FP8)", overwrite=True, evaluation_prompts="\n".join(held_out))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("text_model.encoder.layers.0.mlp.fc1.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("text_projection.weight").dtype == torch.float16
    q = json.loads(meta["fp8clip.stock_compatible"])["quality"]
    assert q["prompts"] == 4 and q["held_out"] == "custom" and 0.9 < q["cond_min"] <= q["cond_mean"] < 1.0
    assert f"conditioning {q['cond_min']:.4f} / {q['cond_mean']:.4f}" in info
    # Stock reads it: its outputs give exactly the quality written into the header.
    (stock,) = call(comfy, "CLIPLoader", clip_name="fp8test/clip_l_stock.safetensors", type="stable_diffusion")
    ref = [encode(comfy, clip, p)[0] for p in held_out]
    cos = [cosine(r, encode(comfy, stock, p)[0]) for r, p in zip(ref, held_out)]
    assert min(cos) == pytest.approx(q["cond_min"], abs=1e-6)
    assert sum(cos) / len(cos) == pytest.approx(q["cond_mean"], abs=1e-6)
    assert path.stat().st_size < 0.55 * os.path.getsize(te_dir / comfy.files["clip_l"])
    with pytest.raises(ValueError, match="stock-compatible export.*'Load CLIP'"):
        call(comfy, "FP8CLIPLoad", clip_name="fp8test/clip_l_stock.safetensors", type="auto", runtime="auto")


def test_stock_compatible_export_says_when_its_evaluation_prompts_hold_none(comfy, clip, te_dir, scratch):
    """Only # lines in evaluation_prompts: the built-in prompts are used, and the text says so, as the quantize
    node's report does (it said nothing; found by review)."""
    scratch(te_dir / "fp8test" / "clip_l_stock_note.safetensors")
    (info,) = call(comfy, "FP8CLIPSave", clip=clip, filename="fp8test/clip_l_stock_note",
                   format="stock-compatible (weights-only FP8)", overwrite=True, evaluation_prompts="# to do\n")
    assert "Note: evaluation_prompts holds no prompt, only # lines: the 24 built-in held-out prompts were used." \
        in info


def test_a_stock_compatible_export_of_a_clip_giving_nan_writes_nothing(pack, clip, tmp_path, monkeypatch):
    """A tower ComfyUI never filled (files that do not make the CLIP type asked for) gives NaN outputs; its
    stock-compatible file loaded in stock ComfyUI without a word (found by review through the command line, which
    now refuses that input earlier). The export refuses whatever gives NaN. The scores are made NaN here."""
    from types import SimpleNamespace

    stock_export = mod(pack, "stock_export")
    monkeypatch.setattr(stock_export, "score", lambda *a: SimpleNamespace(cond_cosine=float("nan"), pooled_cosine=None))
    with torch.inference_mode(), pytest.raises(ValueError, match="NaN or infinite outputs.*nothing was written"):
        stock_export.export_stock_compatible(clip, tmp_path, "nan_clip", held_out=["a cat"])
    assert list(tmp_path.iterdir()) == []


def test_stock_compatible_export_needs_the_original_clip(comfy, qclip):
    with pytest.raises(ValueError, match="casts the original weights: connect the CLIP from your loader"):
        call(comfy, "FP8CLIPSave", clip=qclip, filename="fp8test/x", format="stock-compatible (weights-only FP8)",
             overwrite=True)


def test_saving_never_overwrites_unless_asked_and_is_atomic(comfy, qclip, saved, te_dir, scratch):
    copy = scratch(te_dir / "fp8test" / "clip_l_fp8_copy.safetensors")
    before = saved.read_bytes()[:4096], saved.stat().st_mtime_ns
    with pytest.raises(ValueError, match="clip_l_fp8.safetensors already exists.*set 'overwrite'"):
        call(comfy, "FP8CLIPSave", clip=qclip, filename="fp8test/clip_l_fp8", format="fp8 + scales (Load FP8 CLIP)",
             overwrite=False)
    assert (saved.read_bytes()[:4096], saved.stat().st_mtime_ns) == before
    copy.write_bytes(b"another model")
    with pytest.raises(ValueError, match="clip_l_fp8_copy.safetensors already exists"):
        call(comfy, "FP8CLIPSave", clip=qclip, filename="fp8test/clip_l_fp8_copy.safetensors",
             format="fp8 + scales (Load FP8 CLIP)", overwrite=False)
    assert copy.read_bytes() == b"another model"
    call(comfy, "FP8CLIPSave", clip=qclip, filename="fp8test/clip_l_fp8_copy", format="fp8 + scales (Load FP8 CLIP)",
         overwrite=True)
    with safe_open(str(copy), "pt") as a, safe_open(str(saved), "pt") as b:  # replaced: the same model's file
        assert a.metadata() == b.metadata() and a.keys() == b.keys()
    assert not [p for p in (te_dir / "fp8test").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_load_runs_again_when_its_file_is_saved_again(comfy, saved, te_dir, scratch, monkeypatch):
    """'Save FP8 CLIP' with overwrite, then the same workflow queued again: ComfyUI reused the Load node's
    output, the model from before the file was replaced."""
    import copy

    from harness.host import new_executor, run_graph

    path = scratch(te_dir / "fp8test" / "reloaded.safetensors")
    path.write_bytes(saved.read_bytes())
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FP8CLIPLoad"]
    loads, load = [], node.load
    monkeypatch.setattr(node, "load", lambda self, *a, **k: loads.append(1) or load(self, *a, **k))
    prompt = {"1": {"class_type": "FP8CLIPLoad", "inputs": {"clip_name": "fp8test/reloaded.safetensors",
                                                            "type": "auto", "runtime": "auto"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    ex = new_executor(comfy)
    run_graph(comfy, copy.deepcopy(prompt), ex)  # a copy each time: the executor writes into the prompt
    run_graph(comfy, copy.deepcopy(prompt), ex)
    assert len(loads) == 1  # unchanged: ComfyUI's cached output
    time.sleep(0.01)
    path.write_bytes(saved.read_bytes())  # saved again under its name
    run_graph(comfy, copy.deepcopy(prompt), ex)
    assert len(loads) == 2


def test_saving_the_fake_quant_preview_writes_the_same_file(comfy, quantized, saved, te_dir, scratch):
    path = scratch(te_dir / "fp8test" / "from_fake.safetensors")
    call(comfy, "FP8CLIPSave", clip=quantized[0], filename="fp8test/from_fake", format="fp8 + scales (Load FP8 CLIP)",
         overwrite=True)
    a, b = load_file(str(path)), load_file(str(saved))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == torch.float8_e4m3fn
               else torch.equal(a[k], b[k]) for k in a)


def test_saving_a_clip_with_a_lora_added_after_quantizing_is_refused(comfy, qclip, te_dir):
    """The file would hold the FP8 weights without the LoRA: refused, as encoding that CLIP is."""
    _, lq = call(comfy, "LoraLoader", model=None, clip=qclip, lora_name=comfy.files["lora"], strength_model=0.0,
                 strength_clip=1.0)
    with pytest.raises(Exception, match="Apply LoRAs to the CLIP before the Quantize node"):
        call(comfy, "FP8CLIPSave", clip=lq, filename="fp8test/with_lora", format="fp8 + scales (Load FP8 CLIP)",
             overwrite=False)
    assert not (te_dir / "fp8test" / "with_lora.safetensors").exists()


def test_saving_an_unquantized_clip_in_fp8_format_is_refused(comfy, clip):
    with pytest.raises(ValueError, match="not quantized by this pack.*'Quantize CLIP to FP8'"):
        call(comfy, "FP8CLIPSave", clip=clip, filename="fp8test/x", format="fp8 + scales (Load FP8 CLIP)",
             overwrite=False)


@pytest.mark.parametrize("name", ["../escaped", "fp8test/../../escaped", "/tmp/fp8clip-escaped", "~/escaped",
                                  "C:\\escaped", "..\\escaped", "", "fp8test/.hidden"])
def test_file_names_that_escape_the_models_folder_are_refused(comfy, qclip, te_dir, name):
    with pytest.raises(ValueError, match="outside the models folder|file name is empty|starting with '.'"):
        call(comfy, "FP8CLIPSave", clip=qclip, filename=name, format="fp8 + scales (Load FP8 CLIP)", overwrite=True)
    assert not (te_dir.parent / "escaped.safetensors").exists()
    assert not Path("/tmp/fp8clip-escaped.safetensors").exists()


@pytest.mark.parametrize("name", ["fp8test/clip:l", "fp8test/CON", "fp8test/nul.x", "fp8test/a?b", "fp8test./x",
                                  "fp8test /x"])
def test_file_names_windows_cannot_store_are_refused(comfy, qclip, te_dir, name):
    before = sorted(te_dir.rglob("*"))
    with pytest.raises(ValueError, match="cannot be stored on Windows"):
        call(comfy, "FP8CLIPSave", clip=qclip, filename=name, format="fp8 + scales (Load FP8 CLIP)", overwrite=True)
    assert sorted(te_dir.rglob("*")) == before


def test_load_refuses_names_outside_the_models_folder(comfy):  # pickles: test_pickle_files_are_never_opened
    with pytest.raises(ValueError, match="outside the models folder"):
        call(comfy, "FP8CLIPLoad", clip_name="../loras/" + comfy.files["lora"], type="auto", runtime="auto")


@pytest.fixture
def bad(comfy, te_dir, scratch):
    """bad(name, make): the Load node's error for a file that make(path) writes (deleted after the test)."""
    def load_error(name, make) -> str:
        make(scratch(te_dir / "fp8test" / name))
        with pytest.raises(ValueError) as e:
            call(comfy, "FP8CLIPLoad", clip_name=f"fp8test/{name}", type="auto", runtime="auto")
        return str(e.value)
    return load_error


def test_truncated_file(comfy, saved, bad):
    msg = bad("truncated.safetensors", lambda p: p.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2]))
    assert "truncated or corrupt" in msg and "describes" in msg


def test_corrupt_header(comfy, saved, bad):
    def make(p):
        data = bytearray(saved.read_bytes()[:200000])
        data[8:40] = b"\x00\xff garbage garbage garbage \xfe"
        p.write_bytes(bytes(data))
    assert "header is not valid JSON" in bad("corrupt.safetensors", make)


def test_not_a_safetensors_file_at_all(comfy, bad):
    msg = bad("random.safetensors", lambda p: p.write_bytes(os.urandom(5000)))
    assert "truncated or corrupt" in msg


@pytest.mark.parametrize("fixture,expected", [
    ("clip_l", "ordinary CLIP text encoder, not an FP8 CLIP saved by this pack.*'Load CLIP'"),
    ("t5_stub", "is not a CLIP text encoder"),
    ("lora", "is not a CLIP text encoder"),
])
def test_files_of_another_kind_are_refused_with_the_reason(comfy, bad, fixture, expected):
    src = comfy.base / "models" / ("loras" if fixture == "lora" else "text_encoders") / comfy.files[fixture]
    msg = bad(f"other-{fixture}.safetensors", lambda p: os.link(src, p))
    assert __import__("re").search(expected, msg), msg


def test_missing_weight_scale_of_a_quantized_layer(comfy, saved, bad):
    layer = "text_model.encoder.layers.3.mlp.fc1"
    msg = bad("no-scale.safetensors", lambda p: rewrite(saved, p, drop=[layer + ".weight_scale"]))
    assert f"layer {layer} is stored in FP8 but its weight_scale is missing" in msg


def test_missing_input_scale_of_a_quantized_layer(comfy, saved, bad):
    layer = "text_model.encoder.layers.5.self_attn.q_proj"
    msg = bad("no-input-scale.safetensors", lambda p: rewrite(saved, p, drop=[layer + ".input_scale"]))
    assert f"layer {layer} was calibrated for FP8 activations but its input_scale is missing" in msg


@pytest.mark.parametrize("factor", [2.0, float("nan")])  # NaN once passed the check and made every output NaN
def test_edited_input_scale_inv_is_refused(comfy, saved, bad, factor):
    layer = "text_model.encoder.layers.2.mlp.fc2"
    inv = load_file(str(saved))[layer + ".input_scale_inv"]
    msg = bad("edited-inv.safetensors", lambda p: rewrite(saved, p, replace={layer + ".input_scale_inv": inv * factor}))
    assert f"layer {layer} has a missing or invalid input_scale_inv" in msg


@pytest.mark.parametrize("edit,expected", [
    ({"fp8clip.recipe": "null"}, "header is damaged or was edited"),
    ({"fp8clip.layout": "{not json"}, "header is damaged or was edited"),
    ({"_quantization_metadata": "[]"}, "header is damaged or was edited"),
    ({"fp8clip.report": "{not json"}, "header is damaged or was edited"),  # these three once gave a bare
    ({"fp8clip.kept": "[1, "}, "header is damaged or was edited"),  # JSONDecodeError with no file name
    ({"fp8clip.bundle": "nope"}, "header is damaged or was edited"),
    # JSON of the wrong types: an unhashable set id, tower names iterated letter by letter, a bare TypeError
    ({"fp8clip.bundle": '{"set": [1], "towers": ["clip_l"]}'}, "'set' is not a string"),
    ({"fp8clip.bundle": '{"towers": "clip_l"}'}, "'towers' is not a list of names"),
    ({"fp8clip.recipe": '{"keep": 5}'}, "keep is not a list of patterns"),
    ({"fp8clip.recipe": '{"method": "best"}'}, "its recipe: Unknown calibration method 'best'"),
    ({"fp8clip.format": "-7"}, "invalid fp8clip.format -7"),
])
def test_damaged_header_entries_name_the_file_and_the_fix(comfy, saved, bad, edit, expected):
    msg = bad("edited-header.safetensors", lambda p: rewrite(saved, p, meta_update=edit))
    assert expected in msg and "edited-header.safetensors" in msg, msg


def test_a_saved_report_of_the_wrong_types_is_shown_as_unknown_not_a_crash(pack):
    """The Load node shows the report the file's header holds: values of the wrong type (an edited header) raised
    ValueError or TypeError there, after the file had passed every check (found by review)."""
    text = pack_module(pack, "quant.serialize").summary_text(
        {"family": 3, "cond_min": "x", "cond_mean": 0.99, "pooled_min": None, "prompts": 3, "warnings": "w"})
    assert "?, " in text and "on ? held-out prompts" in text and "conditioning ? / 0.9900" in text
    assert "pooled n/a" in text and "WARNING" not in text
    vision = pack_module(pack, "quant.serialize_vision").summary_text(
        {"embed_cos": "ab", "hidden_cos": [0.99, float("nan"), 0.98]})
    assert "image_embeds ?" in vision and "hidden states nan / nan" in vision


def test_an_edited_weight_shape_in_the_header_is_refused(comfy, saved, bad):
    with safe_open(str(saved), "pt") as f:
        layout = json.loads(f.metadata()["fp8clip.layout"])
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    rows, cols = layout[key]["shape"]
    layout[key]["shape"] = [-rows, -cols]  # same number of values: passes the size check
    msg = bad("edited-shape.safetensors", lambda p: rewrite(saved, p, meta_update={"fp8clip.layout": json.dumps(layout)}))
    assert f"gives {key} the shape [-{rows}, -{cols}]" in msg and "edited-shape.safetensors" in msg, msg


def test_a_symlinked_file_comfyui_lists_loads(comfy, qclip, saved, te_dir, scratch, tmp_path):
    """Model folders are often links to a shared disk: the Load node follows them, as ComfyUI does."""
    outside = tmp_path / "shared" / "clip_l_fp8.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(saved.read_bytes())
    scratch(te_dir / "fp8test" / "linked.safetensors").symlink_to(outside)
    lclip, _ = call(comfy, "FP8CLIPLoad", clip_name="fp8test/linked.safetensors", type="auto", runtime="auto")
    assert torch.equal(encode(comfy, lclip, PROMPTS[0])[0], encode(comfy, qclip, PROMPTS[0])[0])


def test_saved_files_are_readable_as_the_umask_allows(saved):
    """A temp file is created 0600; renamed as it was, other users (a container's host) could not read it."""
    mask = os.umask(0)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask


def test_files_of_format_1_still_load(comfy, qclip, saved, te_dir, scratch):
    """Format 1 did not store input_scale_inv: the layers derive it from input_scale (an ulp off for some
    layers, so close to the quantized CLIP rather than identical)."""
    rewrite(saved, scratch(te_dir / "fp8test" / "format1.safetensors"), drop=lambda k: k.endswith(".input_scale_inv"),
            meta_update={"fp8clip.format": "1"}, meta_drop=["fp8clip.sha256"])  # format 1 had no checksum
    old, _ = call(comfy, "FP8CLIPLoad", clip_name="fp8test/format1.safetensors", type="auto", runtime="auto")
    for p in PROMPTS[:2]:
        assert cosine(encode(comfy, qclip, p)[0], encode(comfy, old, p)[0]) >= 0.999


def test_file_from_a_newer_pack_version(comfy, saved, bad):
    msg = bad("newer.safetensors", lambda p: rewrite(saved, p, meta_update={"fp8clip.format": "7"}))
    assert "newer comfyui-fp8-clip (file format 7" in msg and "Update the pack" in msg


def test_one_tower_of_a_multi_tower_clip_alone_names_the_missing_file(comfy, saved, bad):
    bundle = json.dumps({"class": "SDXLClipModel", "towers": ["clip_g", "clip_l"], "clip_type": "sdxl"})
    msg = bad("sdxl_clip_l.safetensors", lambda p: rewrite(saved, p, meta_update={"fp8clip.bundle": bundle}))
    assert "also select its clip_g file" in msg and "clip_name2" in msg


def test_the_clip_l_of_a_flux_clip_asks_for_its_t5(comfy, saved, bad):
    bundle = json.dumps({"class": "FluxClipModel", "towers": ["clip_l"], "others": ["t5xxl"], "clip_type": "flux"})
    msg = bad("flux_clip_l.safetensors", lambda p: rewrite(saved, p, meta_update={"fp8clip.bundle": bundle}))
    assert "also select the t5xxl file you use with it" in msg


def test_a_stray_or_wrong_partner_file_is_refused_not_built_into_another_clip(comfy, saved):
    """ComfyUI builds the CLIP type from the files it gets: an SD1.5 file with a stock CLIP-L in clip_name2
    became an SDXL CLIP whose CLIP-G was never loaded (NaN conditioning, no warning); any stray file, a
    bundle with an empty tower."""
    load = dict(clip_name="fp8test/clip_l_fp8.safetensors", type="auto", runtime="auto")
    with pytest.raises(ValueError, match=r"fp8clip-fixture-clip_l\.safetensors is a stock CLIP-L text encoder, but "
                                         r"the SD1\.5 \(CLIP-L\) CLIP this clip_l file was saved from is clip_l\. "
                                         r"Set that slot to none"):
        call(comfy, "FP8CLIPLoad", clip_name2=comfy.files["clip_l"], **load)
    with pytest.raises(ValueError, match=r"Too many files: .* is clip_l, and fp8clip-fixture-t5base-stub\.safetensors "
                                         r"would make ComfyUI build another CLIP type"):
        call(comfy, "FP8CLIPLoad", clip_name3=comfy.files["t5_stub"], **load)


def test_the_partner_of_an_sdxl_tower_must_be_its_other_tower(comfy, saved, bad):
    bundle = json.dumps({"class": "SDXLClipModel", "towers": ["clip_g", "clip_l"], "clip_type": "sdxl"})
    bad("sdxl_clip_l.safetensors", lambda p: rewrite(saved, p, meta_update={"fp8clip.bundle": bundle}))
    with pytest.raises(ValueError, match=r"is a stock CLIP-L text encoder, .* is clip_l \+ clip_g: select its "
                                         r"clip_g file instead"):
        call(comfy, "FP8CLIPLoad", clip_name="fp8test/sdxl_clip_l.safetensors", clip_name2=comfy.files["clip_l"],
             type="auto", runtime="auto")
    # The right partner, in either slot (ComfyUI's own loaders take towers in any order): the same CLIP.
    outs = []
    for first, second in (("fp8test/sdxl_clip_l.safetensors", comfy.files["clip_g"]),
                          (comfy.files["clip_g"], "fp8test/sdxl_clip_l.safetensors")):
        clip, _ = call(comfy, "FP8CLIPLoad", clip_name=first, clip_name2=second, type="auto", runtime="auto")
        outs.append(encode(comfy, clip, PROMPTS[0]))
        del clip
        gc.collect()
    assert outs[0][0].shape == (1, 77, 2048) and torch.equal(outs[0][0], outs[1][0])


def test_a_file_damaged_inside_its_data_is_refused(comfy, saved, bad):
    """A zeroed tail (an interrupted copy into a preallocated file) passes every structural check: it loaded and
    encoded at cosine 0.46. The header's SHA-256 of the tensors catches it, and a single flipped bit."""
    def zero_tail(p):
        data = bytearray(saved.read_bytes())
        data[int(len(data) * 0.6):] = bytes(len(data) - int(len(data) * 0.6))
        p.write_bytes(bytes(data))

    def flip_a_bit(p):
        data = bytearray(saved.read_bytes())
        data[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(data))

    for name, make in (("zero-tail.safetensors", zero_tail), ("bit-flip.safetensors", flip_a_bit)):
        msg = bad(name, make)
        assert f"{name}: its data does not match the checksum saved with it" in msg, msg


def test_pickle_files_are_never_opened(pack, tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="not a .safetensors file.*pickle"):
        mod(pack, "fileformat").read_tower_file(p)


# --- the command line ------------------------------------------------------------------------------------------

PACK_DIR = Path(__file__).resolve().parent.parent


def cli(comfy, *args, cwd=None, module=False):
    import subprocess
    import sys

    cmd = [sys.executable, *(["-m", "fp8clip"] if module else [str(PACK_DIR)]), *map(str, args)]
    env = dict(os.environ, COMFYUI_PATH=str(comfy.host), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(cmd, cwd=cwd or comfy.base, capture_output=True, text=True, env=env, timeout=900)


def test_command_line_quantize_gives_the_nodes_result(comfy, pack, qclip, tmp_path):
    (tmp_path / "cal.txt").write_text("# calibration\n" + CAL + "\n")
    (tmp_path / "eval.txt").write_text(EVAL)
    src = comfy.base / "models" / "text_encoders" / comfy.files["clip_l"]
    out = tmp_path / "out" / "clip_l_fp8.safetensors"
    r = cli(comfy, "quantize", src, out, "--prompts", tmp_path / "cal.txt", "--eval-prompts", tmp_path / "eval.txt",
            "--keep", "*text_projection", "--min-cosine", "0.99999", cwd=PACK_DIR, module=True)
    # a report below --min-cosine: the file is saved and the exit status tells a script (it was 0)
    assert r.returncode == 1, r.stderr[-4000:]
    assert "Quality below your threshold 0.99999 " in r.stdout  # not "1.0000"
    assert "FP8 E4M3 CLIP quality report: SD1.5 (CLIP-L)" in r.stdout and "on 2 held-out prompts" in r.stdout
    assert f"Saved {out}" in r.stdout and "calibrating + evaluating" in r.stderr  # the progress bar
    # Same prompts and recipe as the node's fixture: the same FP8 CLIP, bit for bit.
    lclip, _ = mod(pack, "serialize").load_fp8_clip([out])
    ref = encode(comfy, qclip, PROMPTS[1])
    got = encode(comfy, lclip, PROMPTS[1])
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    again = cli(comfy, "quantize", src, out, "--prompts", tmp_path / "cal.txt")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    info = cli(comfy, "info", out)
    assert info.returncode == 0 and "tower: clip_l" in info.stdout and "held-out prompts" in info.stdout


def test_command_line_bad_input(comfy, tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    r = cli(comfy, "quantize", pickle, tmp_path / "out.safetensors")
    assert r.returncode == 2 and "not a .safetensors file" in r.stderr and "Traceback" not in r.stderr
    r = cli(comfy, "info", comfy.base / "models" / "text_encoders" / comfy.files["t5_stub"])
    assert r.returncode == 2 and "is not a CLIP text encoder" in r.stderr
    r = cli(comfy, "--comfyui", tmp_path, "quantize", pickle, tmp_path / "out.safetensors")
    assert r.returncode == 2 and "is not a ComfyUI folder" in r.stderr
    r = cli(comfy, "info", tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "missing.safetensors: no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "folder.safetensors").mkdir()
    r = cli(comfy, "info", tmp_path / "folder.safetensors")
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr
    src = comfy.base / "models" / "text_encoders" / comfy.files["clip_l"]
    r = cli(comfy, "quantize", src, tmp_path / "out.safetensors", "--prompts", tmp_path / "no-prompts.txt")
    assert r.returncode == 2 and "cannot read the prompts" in r.stderr and "Traceback" not in r.stderr


# Runs the real command line, several commands in one process, with the calibration replaced by a probe that
# says it started and stops: what the CLI checks before the minutes of calibration, without them.
CLI_PROBE = r'''
import contextlib, importlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import fp8clip
fp8clip.load_pack()
cli = importlib.import_module("comfyui_fp8_clip.cli")
boot = cli.boot_comfyui
def booted(*a, **k):
    boot(*a, **k)
    calibrate = importlib.import_module("comfyui_fp8_clip.quant.calibrate")
    def probe(clip, prompts, *a, **k):
        print(f"CALIBRATION STARTED: {type(clip.cond_stage_model).__name__}", file=sys.stderr)
        raise SystemExit(3)
    calibrate.quantize_clip = probe
cli.boot_comfyui = booted
out = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
    out.append([rc, err.getvalue()])
print(json.dumps(out))
'''


def test_command_line_refuses_what_it_cannot_quantize_before_calibrating(comfy, saved, tmp_path):
    """Found by review: each of these calibrated (minutes) and then failed, or quietly did something else:
    a prompts file of only # lines (the 64 built-in prompts were used), an output folder that cannot exist,
    a CLIP vision file (an SD1.5 CLIP of unloaded weights), clip_l + T5 without --type (an SDXL CLIP with an
    empty CLIP-G), a file of this pack (a size-mismatch traceback); build-engine named the loader nodes, not
    --vision; options after the command were 'unrecognized'."""
    import subprocess
    import sys

    te = comfy.base / "models" / "text_encoders"
    clip_l, t5 = te / comfy.files["clip_l"], te / comfy.files["t5_stub"]
    vit = comfy.base / "models" / "clip_vision" / comfy.files["vit_l"]
    (tmp_path / "comments.txt").write_text("# my prompts, to be filled in\n\n")
    (tmp_path / "bom.txt").write_text("# my prompts, to be filled in\r\n", encoding="utf-8-sig")
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    out = tmp_path / "out.safetensors"
    vision_header = tmp_path / "cv_fp8.safetensors"
    save_file({"x": torch.zeros(1)}, str(vision_header), metadata={"fp8clip.format": "2",
                                                                   "fp8clip.tower": "vision_model"})
    cases = [
        (["quantize", clip_l, out, "--prompts", tmp_path / "comments.txt"], 2, "no prompt in it"),
        (["quantize", clip_l, out, "--eval-prompts", tmp_path / "comments.txt"], 2, "no prompt in it"),
        # saved by Windows Notepad: a byte-order mark made the comment line a prompt (found by review)
        (["quantize", clip_l, out, "--prompts", tmp_path / "bom.txt"], 2, "no prompt in it"),
        (["quantize", clip_l, tmp_path / "blocker" / "out.safetensors"], 2, "cannot write there"),
        (["quantize", vit, out], 2, "is a CLIP vision model"),
        (["quantize", clip_l, out, "--input2", t5], 2, "give the CLIP they make with --type"),
        (["quantize", saved, out], 2, "already an FP8 file of this pack"),
        (["build-engine", vision_header, "--portable", "--cache", tmp_path / "engines"], 2, "add --vision"),
        (["build-engine", saved, "--vision", "--portable", "--cache", tmp_path / "engines"], 2,
         "leave out --vision"),
        (["info", saved, "--comfyui", comfy.host], 0, ""),
        # found by the second review: a --type whose CLIP has a tower in none of the files (an SDXL CLIP-G never
        # loaded: NaN conditioning, and a stock-compatible file of garbage that stock loaders take)
        (["quantize", clip_l, out, "--input2", t5, "--type", "sdxl"], 2, "clip_g is in none of them"),
        (["quantize", clip_l, out, "--input2", clip_l, "--type", "sdxl"], 2, "clip_g is in none of them"),
        (["quantize", clip_l, out, "--input2", t5, "--type", "sd3"], 2, "could not build a sd3 CLIP"),
        (["quantize", clip_l, clip_l, "--overwrite"], 2, "is an input of this command"),
        (["quantize", clip_l, tmp_path / "folder.safetensors", "--overwrite"], 2, "is a folder"),
        (["quantize", clip_l, tmp_path / "clip:l.safetensors"], 2, "File name 'clip:l.safetensors'"),
        (["quantize", clip_l, out, "--format", "stock-compatible", "--method", "mse"], 2,
         "--method: the stock-compatible format casts the weights without calibrating"),
        (["quantize", clip_l, out, "--min-cosine", "2"], 2, "give a cosine from 0 to 1"),
        (["quantize", clip_l, out, "--scope", "weights only", "--prompts", tmp_path / "one.txt"], 2,
         "--prompts: not used with --scope 'weights only'"),
        (["quantize", tmp_path / "folder.safetensors", out], 2, "is a folder"),
        (["quantize", comfy.base / "models" / "checkpoints" / comfy.files["sd15_ckpt"], out], 2,
         "a checkpoint's CLIP is quantized by the node"),
        (["build-engine", vision_header, "--portable", "--cache", tmp_path / "engines", "--base-directory",
          comfy.base], 2, "add --vision"),  # ComfyUI's options after the command, as the README says
        (["quantize", clip_l, tmp_path / "stock.safetensors", "--format", "stock-compatible", "--no-fp8-embedding",
          "--eval-prompts", tmp_path / "one.txt"], 0, ""),
        (["quantize", clip_l, out], 3, "CALIBRATION STARTED: SD1ClipModel"),  # the probe: a good input gets there
    ]
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "one.txt").write_text("a cat\n")
    (tmp_path / "probe.py").write_text(CLI_PROBE)
    env = dict(os.environ, COMFYUI_PATH=str(comfy.host), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(PACK_DIR),
                        json.dumps([[str(x) for x in argv] for argv, _, _ in cases])],
                       cwd=comfy.base, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for (argv, rc, text), (got_rc, err) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1])):
        assert (got_rc, text in err, "Traceback" in err) == (rc, True, False), (argv[0], argv[-1], got_rc, err[-1500:])
    assert not (tmp_path / "engines").exists()  # refused before the cache folder was made
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["cv_fp8.safetensors", "folder.safetensors",
                                                                       "stock.safetensors"]
    assert clip_l.stat().st_size > 200e6  # not replaced by its own output
    with safe_open(str(tmp_path / "stock.safetensors"), "pt") as f:  # --no-fp8-embedding was ignored there
        assert f.get_tensor("text_model.embeddings.token_embedding.weight").dtype == torch.float16
        assert f.get_tensor("text_model.encoder.layers.0.mlp.fc1.weight").dtype == torch.float8_e4m3fn


def test_command_line_finds_the_comfyui_holding_a_symlinked_pack(comfy, tmp_path):
    """A pack symlinked into custom_nodes (a developer's install) resolved to its real folder, and the command line
    answered 'Where is ComfyUI?'."""
    import subprocess
    import sys

    cui = tmp_path / "ComfyUI"
    cui.mkdir()
    for entry in Path(comfy.host).iterdir():
        if entry.name != "custom_nodes":
            (cui / entry.name).symlink_to(entry)
    (cui / "custom_nodes").mkdir()
    (cui / "custom_nodes" / "comfyui-fp8-clip").symlink_to(PACK_DIR, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    r = subprocess.run([sys.executable, str(cui / "custom_nodes" / "comfyui-fp8-clip"), "quantize",
                        tmp_path / "missing.safetensors", tmp_path / "out.safetensors"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=900)
    assert "Where is ComfyUI" not in r.stderr and "missing.safetensors: no such file" in r.stderr, r.stderr[-2000:]


def test_command_line_build_engine_builds_once_into_the_cache(comfy, saved, tmp_path):
    """Ahead-of-time engine builds from a saved file: a real TensorRT for RTX build (no GPU needed with
    --portable), written to the cache with its manifest, found again with no build."""
    cache = tmp_path / "engines"
    r = cli(comfy, "build-engine", saved, "--portable", "--max-rows", "2", "--cache", cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "clip_l: built in" in r.stdout and "portable engine" in r.stdout
    engines = sorted(cache.rglob("*.engine"))
    assert len(engines) == 1 and engines[0].with_suffix(".json").is_file()
    assert engines[0].stat().st_size > 60 * 2**20  # CLIP-L with FP8 weights (an FP16 engine is ~167 MB)
    again = cli(comfy, "build-engine", saved, "--portable", "--max-rows", "2", "--cache", cache)
    assert again.returncode == 0 and "clip_l: found in the cache, no build" in again.stdout
    no_gpu = cli(comfy, "build-engine", saved, "--cache", cache)  # this machine has no CUDA GPU
    assert no_gpu.returncode == 2 and "No engine can be built here" in no_gpu.stderr and "--portable" in no_gpu.stderr
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    unusable = cli(comfy, "build-engine", saved, "--portable", "--max-rows", "2", "--cache", tmp_path / "blocker" / "e")
    # refused before the model is loaded and built, not after
    assert unusable.returncode == 2 and "Cannot create the TensorRT engine folder" in unusable.stderr
    assert "building" not in unusable.stderr
    for rows in ("0", "65", "-1"):
        bad = cli(comfy, "build-engine", saved, "--portable", "--max-rows", rows, "--cache", cache)
        assert bad.returncode == 2 and "give a whole number from 1 to 64" in bad.stderr, rows
    # ComfyUI's model folders as its main.py sets them: the node's engine cache is the one extra_model_paths names
    (tmp_path / "extra.yaml").write_text(f"fp8test:\n    base_path: {tmp_path}\n    tensorrt: engines\n")
    via = cli(comfy, "--extra-model-paths-config", tmp_path / "extra.yaml", "build-engine", saved, "--portable",
              "--max-rows", "2")
    assert via.returncode == 0, via.stderr[-4000:]
    assert f"engine cache: {cache}" in via.stderr and "clip_l: found in the cache, no build" in via.stdout
    (tmp_path / "base" / "models").mkdir(parents=True)  # ComfyUI Desktop's --base-directory
    (tmp_path / "base" / "models" / "tensorrt").symlink_to(cache, target_is_directory=True)
    based = cli(comfy, "--base-directory", tmp_path / "base", "build-engine", saved, "--portable", "--max-rows", "2")
    assert based.returncode == 0, based.stderr[-4000:]
    assert f"engine cache: {tmp_path / 'base' / 'models' / 'tensorrt'}" in based.stderr
    assert "clip_l: found in the cache, no build" in based.stdout


def test_the_file_gives_the_engine_key_the_node_looks_up(pack, qclip, loaded, rtx):
    """`build-engine` builds from the saved file; the TensorRT node, later, from the quantize node's CLIP. The same
    key (same GPU, TensorRT and rows) is what lets the node find the engine the command line built."""
    pipeline, build = (pack_module(pack, f"trt_runtime.{n}") for n in ("pipeline", "build"))
    spec_of = pack_module(pack, "trt_runtime.onnx_export").spec_from_module
    artifact = mod(pack, "artifact")

    def key(clip, rows=8):
        ((module, record),) = artifact.quantized_towers(clip).values()
        comps = pipeline.components(spec_of(module, record), rtx, build.Profile(max_rows=rows), "float32")
        return pipeline.engine_key(comps)

    assert key(loaded[0]) == key(qclip)
    assert key(loaded[0], rows=4) != key(qclip)  # and the key does see what changes the engine


def test_a_multi_tower_save_that_fails_part_way_leaves_no_half_set(pack, tmp_path):
    """SDXL saves a file per tower: a full disk at the second must not leave the first, which would block the
    retry ("already exists") or pair a new clip_l with an old clip_g."""
    paths = pack_module(pack, "quant.paths")
    files = [tmp_path / "sdxl_clip_l.safetensors", tmp_path / "sdxl_clip_g.safetensors"]

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match=r"Could not save sdxl_clip_g\.safetensors in .*: No space left on device\. "
                                         r"Free disk space there, or save into another folder\. Nothing was changed"):
        paths.write_set([(files[0], lambda tmp: Path(tmp).write_bytes(b"l")), (files[1], full_disk)], False)
    assert list(tmp_path.iterdir()) == []
    written = paths.write_set([(f, lambda tmp, f=f: Path(tmp).write_bytes(f.name.encode())) for f in files], False)
    assert written == files and [f.read_bytes() for f in files] == [f.name.encode() for f in files]


def test_a_write_that_safetensors_cannot_finish_gets_the_fix(tmp_path):
    """safetensors reports a failed write as its own SafetensorError ("... (os error 28)" on a full disk), not
    an OSError: the save failed with that raw error, without the fix or "Nothing was changed". A real failed
    write through the real safetensors: a child process whose file size limit is 4 KB (EFBIG)."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import resource, signal, sys, torch
        from pathlib import Path
        from safetensors.torch import save_file
        from quant import paths
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            paths.write_atomic(Path(sys.argv[1]), lambda tmp: save_file({"w": torch.zeros(100000)}, tmp), False)
        except ValueError as e:
            print("REFUSED", e)
    """)
    target = tmp_path / "clip_l_fp8.safetensors"
    run = subprocess.run([sys.executable, "-c", child, str(target)], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (f"REFUSED Could not save clip_l_fp8.safetensors in {tmp_path}: File too large. That file system or "
            "account limits file sizes" in run.stdout and "Nothing was changed there." in run.stdout), run
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_multi_tower_set_that_fails_part_way_keeps_the_old_set(pack, tmp_path, monkeypatch):
    """Overwriting SDXL's pair with another model's: a full disk at the second file, or a failed move into
    place, must leave the old pair whole, never a new clip_l beside the old clip_g."""
    paths = pack_module(pack, "quant.paths")
    files = [tmp_path / "sdxl_clip_l.safetensors", tmp_path / "sdxl_clip_g.safetensors"]
    for f in files:
        f.write_bytes(b"old " + f.name.encode())

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match="No space left on device. Free disk space there"):
        paths.write_set([(files[0], lambda tmp: Path(tmp).write_bytes(b"new l")), (files[1], full_disk)], True)
    assert [f.read_bytes() for f in files] == [b"old " + f.name.encode() for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)

    real_replace, moves = os.replace, []

    def replace(src, dst):  # the second file's move into place fails
        if str(dst) == str(files[1]) and str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        moves.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(paths.os, "replace", replace)
    with pytest.raises(ValueError, match="Input/output error. Nothing was changed"):
        paths.write_set([(f, lambda tmp, f=f: Path(tmp).write_bytes(b"new " + f.name.encode())) for f in files],
                        True)
    assert moves  # the first file was moved into place, then put back
    assert [f.read_bytes() for f in files] == [b"old " + f.name.encode() for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)
    monkeypatch.setattr(paths.os, "replace", real_replace)
    paths.write_set([(f, lambda tmp, f=f: Path(tmp).write_bytes(b"new " + f.name.encode())) for f in files], True)
    assert [f.read_bytes() for f in files] == [b"new " + f.name.encode() for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)


def test_a_folder_where_the_file_would_go_is_refused_not_hidden(pack, tmp_path):
    """'overwrite' on a name that is a folder renamed the user's folder to a hidden temp name, then failed."""
    paths = pack_module(pack, "quant.paths")
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"x\.safetensors in .* is a folder, not a file\. Choose another file name"):
        paths.write_set([(folder, lambda tmp: Path(tmp).write_bytes(b"model"))], True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"] and (folder / "keep.txt").read_text() == "mine"


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(pack, tmp_path):
    paths = pack_module(pack, "quant.paths")
    target = tmp_path / "clip_l_fp8.safetensors"
    stale, fresh = (tmp_path / f".clip_l_fp8.safetensors.{h * 16}.tmp" for h in "ab")
    stale.write_bytes(b"half a model")
    fresh.write_bytes(b"another save, still writing")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    other = tmp_path / ".unrelated.tmp"
    other.write_bytes(b"not ours")
    paths.write_set([(target, lambda tmp: Path(tmp).write_bytes(b"model"))], False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, fresh.name, other.name])


def test_a_backup_made_now_of_an_old_file_is_not_swept_by_another_save(pack, tmp_path, monkeypatch):
    """Overwriting keeps the old file under a hidden name until the new one is in place. A hard link keeps the
    old file's mtime, by which another save into the folder swept that backup as stale; a failed move then
    could not put the old file back, and the message said nothing was changed (found by review)."""
    paths = pack_module(pack, "quant.paths")
    target = tmp_path / "clip_l_fp8.safetensors"
    target.write_bytes(b"old model")
    os.utime(target, (time.time() - 2 * 3600,) * 2)
    backup = Path(paths._set_aside(target))
    paths.write_set([(target, lambda tmp: Path(tmp).write_bytes(b"other"))], True)  # another save: sweeps
    assert backup.exists() and backup.read_bytes() == b"old model"
    made_long_ago = tmp_path / f".{target.name}.{int(time.time()) - 2 * 3600:08x}00000000.old"
    made_long_ago.write_bytes(b"left by a killed save")
    os.utime(made_long_ago, (time.time() - 2 * 3600,) * 2)  # a link's mtime: the old file's
    paths.write_set([(target, lambda tmp: Path(tmp).write_bytes(b"other"))], True)
    assert backup.exists() and not made_long_ago.exists()

    real_replace = os.replace

    def replace(src, dst):  # the move into place fails, and so does putting the old file back
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(paths.os, "replace", replace)
    monkeypatch.setattr(paths.os, "link", lambda a, b: real_replace(a, b))  # no hard links: a rename
    with pytest.raises(ValueError, match=r"previous file could not be put back \(Input/output error\)\. It is "
                                         r"kept as .*\.old: rename it to clip_l_fp8\.safetensors to get it back"):
        paths.write_set([(target, lambda tmp: Path(tmp).write_bytes(b"new"))], True)


def test_a_set_whose_old_files_cannot_be_put_back_names_each_and_tries_all(pack, tmp_path, monkeypatch):
    """The third file's move fails, then putting back all three fails too (a file system without hard links:
    the old files were renamed aside): each kept backup is named (the first failure stopped the others from being
    tried)."""
    paths = pack_module(pack, "quant.paths")
    files = [tmp_path / f"bundle_{t}.safetensors" for t in ("clip_l", "clip_g", "t5")]
    for f in files:
        f.write_bytes(b"old")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".old") or (str(dst) == str(files[2]) and str(src).endswith(".tmp")):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)
    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(paths.os, "replace", replace)
    monkeypatch.setattr(paths.os, "link", no_hard_links)
    with pytest.raises(ValueError) as e:
        paths.write_set([(f, lambda tmp: Path(tmp).write_bytes(b"new")) for f in files], True)
    for f in files:
        assert str(e.value).count(f"rename it to {f.name} to get it back") == 1, str(e.value)
    assert str(e.value).startswith("Saving failed ([Errno 5] Input/output error). ")
    backups = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".old"))
    assert len(backups) == 3 and all(b.read_bytes() == b"old" for b in backups)


def _tower_file(ff, tower: str, family: str, bundle: dict):
    return ff.TowerFile(tower=tower, family=family, tensors={}, quantized={}, rowwise=[],
                        header={ff.H_BUNDLE: json.dumps(bundle)})


_SD15_L = ("clip_l", "SD1.5 (CLIP-L)", {"class": "SD1ClipModel", "towers": ["clip_l"], "others": [],
                                          "clip_type": "stable_diffusion"})
_SDXL_L = ("clip_l", "SDXL (CLIP-L + CLIP-G)", {"class": "SDXLClipModel", "towers": ["clip_l", "clip_g"],
                                                  "others": [], "clip_type": "sdxl", "set": "0123456789abcdef"})
_SDXL_G = ("clip_g", "SDXL (CLIP-L + CLIP-G)", {"class": "SDXLClipModel", "towers": ["clip_l", "clip_g"],
                                                  "others": [], "clip_type": "sdxl", "set": "0123456789abcdef"})
_REFINER_G = ("clip_g", "SDXL refiner (CLIP-G)", {"class": "SDXLRefinerClipModel", "towers": ["clip_g"],
                                                    "others": [], "clip_type": "stable_diffusion"})


@pytest.mark.parametrize("other", [_SDXL_G, _REFINER_G], ids=["sdxl-set-clip_g", "refiner-clip_g"])
def test_fp8_files_of_two_saves_are_refused_even_without_a_set_id(pack, other):
    """README: 'Load refuses a clip_l and a clip_g from different saves'. Only two set ids were compared: an SD1.5
    clip_l (a one-tower save has no set id) beside an SDXL or refiner clip_g loaded as one SDXL CLIP of two
    models (found by review, encoded [1, 77, 2048] without a word)."""
    ff, ser = mod(pack, "fileformat"), mod(pack, "serialize")
    with pytest.raises(ValueError, match="come from different saves"):
        ser.check_bundle([_tower_file(ff, *_SD15_L), _tower_file(ff, *other)], [])
    ser.check_bundle([_tower_file(ff, *_SDXL_L), _tower_file(ff, *_SDXL_G)], [])  # one save: fine


def test_a_name_ending_in_a_folder_separator_is_refused_and_a_listed_tilde_name_is_not(pack, tmp_path):
    """'fp8/' was written as fp8.safetensors beside the folder by Save FP8 CLIP Vision (the text save refused
    it); '~old_clip_fp8.safetensors', which ComfyUI lists in the loaders, was refused as outside the folder."""
    paths = mod(pack, "paths")
    for name in ("fp8/", "fp8\\"):
        with pytest.raises(ValueError, match="ends with a folder separator"):
            paths.resolve_in_folder(tmp_path, name)
    assert paths.resolve_in_folder(tmp_path, "~old_clip_fp8") == (tmp_path / "~old_clip_fp8.safetensors").resolve()
    assert paths.check_name("fp8/~old_clip_fp8.safetensors") == "fp8/~old_clip_fp8.safetensors"
    with pytest.raises(ValueError, match="outside the models folder"):
        paths.check_name("~/clip_fp8.safetensors")


def test_a_name_of_only_a_dot_or_with_spaces_around_it(pack, tmp_path):
    """'.' raised an IndexError (the command line reaches it), and ' name ' was saved as 'name .safetensors'."""
    paths, serialize = mod(pack, "paths"), mod(pack, "serialize")
    with pytest.raises(ValueError, match="names no file"):
        paths.check_name(".")
    assert serialize.tower_file_names(" fp8/clip_l_fp8 ", ["clip_l"]) == ["fp8/clip_l_fp8.safetensors"]
    assert serialize.tower_file_names(" sdxl ", ["clip_l", "clip_g"]) == ["sdxl_clip_l.safetensors",
                                                                           "sdxl_clip_g.safetensors"]
