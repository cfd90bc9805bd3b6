"""SDXL, SD3 and Flux text encoders: every CLIP tower quantized, T5 passed through, shapes kept.

Full-size seeded random CLIP-L and CLIP-G (695M parameters) through the stock DualCLIPLoader; Flux's T5-XXL
is built at a reduced size (a full one is 4.7B parameters) inside ComfyUI's real Flux text-encoder class.
"""
from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import call, cosine, encode, pack_module
from test_quantize_clip import quantize

CAL = "\n".join(["a photo of a cat", "a castle at sunset, oil painting", "(masterpiece:1.2), anime girl",
                 "cyberpunk street at night, neon, rain", "blurry, low quality, watermark",
                 "a bowl of ramen, food photography", "macro photograph of a dew drop",
                 "portrait of an old fisherman, 85mm"])
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunrise"
EVAL = "a photo of a dog on the beach\n(masterpiece:1.3), a phoenix"  # CPU time: each prompt costs seconds
# The SD3 test checks the bundle's wiring (the SDXL fixture checks the quality): the least calibration that works.
CAL_FEW, EVAL_ONE = "\n".join(CAL.splitlines()[:3]), EVAL.splitlines()[0]


@pytest.fixture(scope="module")
def sdxl(comfy):
    clip = call(comfy, "DualCLIPLoader", clip_name1=comfy.files["clip_l"], clip_name2=comfy.files["clip_g"],
                type="sdxl")[0]
    out = quantize(comfy, clip, calibration_prompts=CAL, evaluation_prompts=EVAL)
    return clip, out["result"][0], out["result"][1]


def test_sdxl_both_towers_quantized_with_shapes_and_report(comfy, sdxl):
    clip, q, report = sdxl
    print("\n" + report)
    assert report.startswith("FP8 E4M3 CLIP quality report: SDXL (CLIP-L + CLIP-G)")
    assert "clip_l: 72 Linear layers in FP8" in report and "clip_g: 192 Linear layers in FP8" in report
    assert "on 2 held-out prompts" in report
    assert re.search(r"clip_l alone: hidden 0\.99\d+", report) and re.search(r"clip_g alone: hidden 0\.99\d+", report)
    # SDXL passes CLIP-G's pooled output on; CLIP-L's is read by nothing (and uninitialized in SDXL checkpoints)
    assert re.search(r"clip_l alone: .*, pooled not used \(SDXL models read another tower's\)", report)
    assert re.search(r"clip_g alone: .*, pooled 0\.99\d+", report)
    rc, rp = encode(comfy, clip, PROMPT)
    gc, gp = encode(comfy, q, PROMPT)
    assert rc.shape == gc.shape == (1, 77, 2048) and rp.shape == gp.shape == (1, 1280)
    assert cosine(rc, gc) > 0.99 and float(torch.nn.functional.cosine_similarity(rp, gp)) > 0.99
    long = ", ".join(f"detail {i}" for i in range(60))
    lq, lr = encode(comfy, q, long)[0], encode(comfy, clip, long)[0]
    assert lq.shape == lr.shape and lq.shape[1] >= 3 * 77 and lq.shape[1] % 77 == 0


def test_sdxl_saved_and_loaded_again_encodes_bit_identically(comfy, sdxl):
    """Save FP8 CLIP writes a file per tower; Load FP8 CLIP rebuilds the pair with type auto (as saved) or sdxl
    (ComfyUI has no SDXL CLIP type: DualCLIPLoader builds the pair as stable_diffusion, and so must this)."""
    from test_save_load import rewrite

    _, q, _ = sdxl
    folder = Path(comfy.folder_paths.get_folder_paths("text_encoders")[0]) / "fp8sdxl"
    try:
        (info,) = call(comfy, "FP8CLIPSave", clip=q, filename="fp8sdxl/pair", format="fp8 + scales (Load FP8 CLIP)",
                       overwrite=False)
        assert sorted(p.name for p in folder.iterdir()) == ["pair_clip_g.safetensors", "pair_clip_l.safetensors"]
        names = dict(clip_name="fp8sdxl/pair_clip_l.safetensors", clip_name2="fp8sdxl/pair_clip_g.safetensors")
        want = {p: encode(comfy, q, p) for p in (PROMPT, "a (red:1.4) fox in the snow")}  # 1 row; 2 rows
        for ctype, prompts in (("auto", list(want)), ("sdxl", [PROMPT])):  # a full SDXL encode: 3 s on CI
            loaded, _ = call(comfy, "FP8CLIPLoad", type=ctype, runtime="auto", **names)
            for prompt in prompts:
                (a, ap), (b, bp) = want[prompt], encode(comfy, loaded, prompt)
                assert torch.equal(a, b) and torch.equal(ap, bp), (ctype, prompt)
            del loaded  # an SDXL CLIP is GBs: one at a time
            gc.collect()
        # clip_g of another save beside this clip_l (a set half overwritten): refused, not loaded as a pair
        g = folder / "pair_clip_g.safetensors"
        with safe_open(str(g), "pt") as f:
            bundle = json.loads(f.metadata()["fp8clip.bundle"])
        rewrite(g, folder / "other_clip_g.safetensors",
                meta_update={"fp8clip.bundle": json.dumps({**bundle, "set": "0" * 16})})
        with pytest.raises(ValueError, match="come from different saves"):
            call(comfy, "FP8CLIPLoad", type="auto", runtime="auto", clip_name="fp8sdxl/pair_clip_l.safetensors",
                 clip_name2="fp8sdxl/other_clip_g.safetensors")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_sdxl_default_clip_skip_is_preserved(comfy, sdxl):
    """SDXL conditions on the penultimate layers without the final LayerNorm; the FP8 towers must too."""
    clip, q, _ = sdxl
    tl = q.patcher.object_patches["clip_l.transformer"]
    seen = {}
    h = tl.register_forward_hook(lambda m, a, k, o: seen.update(k), with_kwargs=True)
    try:
        encode(comfy, q, PROMPT)
    finally:
        h.remove()
    assert seen["intermediate_output"] in (-2, 10) and seen["final_layer_norm_intermediate"] is False
    (q_skip,) = call(comfy, "CLIPSetLastLayer", clip=q, stop_at_clip_layer=-3)
    (r_skip,) = call(comfy, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-3)
    r, g = encode(comfy, r_skip, PROMPT)[0], encode(comfy, q_skip, PROMPT)[0]
    assert cosine(r, g) > 0.99 and cosine(r, encode(comfy, clip, PROMPT)[0]) < 0.99


def test_quantized_towers_stay_on_the_gpu_while_comfyui_keeps_their_model_loaded(comfy, pack, sdxl, fp8_clip,
                                                                                 monkeypatch):
    """On a GPU a quantized tower moves to the GPU when it runs. It stays there while ComfyUI counts its model as
    loaded with the static patcher, as the stock encoders stay beside each other (an unCLIP workflow's CLIP and
    CLIP vision: each switch cost 13-18 ms on an H100): ComfyUI unloads that model when it needs the memory,
    and the towers go back then. Where ComfyUI would not (a clone of the same CLIP loaded in its place; v0.29's
    dynamic VRAM, which never unloads one dynamic model for another), another model's tower running sends them
    back. SDXL's CLIP-L and CLIP-G run in every encode and never send each other back (that cost 327 ms per encode
    on an H200). Here (no GPU) the offload device is made to differ from the load device and what leaves the
    load device is recorded instead of moved."""
    import comfy.model_management as mm

    proxy = pack_module(pack, "quant.proxy")
    q, l_only, fake = sdxl[1], fp8_clip[1], fp8_clip[2]
    with torch.inference_mode():  # a second FP8 conversion of the same SD1.5 CLIP: a clone of l_only's model
        other = pack_module(pack, "quant.runtime").to_fp8_runtime(fake, "fp8")[0]
    towers = {"clip_l": q.patcher.object_patches["clip_l.transformer"],
              "clip_g": q.patcher.object_patches["clip_g.transformer"],
              "sd15": l_only.patcher.object_patches["clip_l.transformer"],
              "sd15 again": other.patcher.object_patches["clip_l.transformer"]}
    assert all(isinstance(t, proxy.TowerProxy) for t in towers.values())
    name = {id(t): n for n, t in towers.items()}
    sent_back: list[str] = []

    def record(self):
        if self in proxy._RESIDENT:
            sent_back.append(name[id(self)])
        proxy._RESIDENT.discard(self)

    monkeypatch.setattr(proxy.TowerProxy, "offload_now", record)
    monkeypatch.setattr(proxy.TowerProxy, "retarget", lambda self, *devices: None)  # keep the stand-in devices
    saved = {n: t.offload_device for n, t in towers.items()}
    try:
        for t in towers.values():
            object.__setattr__(t, "offload_device", torch.device("meta"))
        for _ in range(2):
            encode(comfy, q, PROMPT)
        assert sent_back == [], "SDXL's towers sent each other back to the offload device"
        encode(comfy, l_only, PROMPT)
        encode(comfy, q, PROMPT)
        assert sent_back == [], "towers of a model ComfyUI keeps loaded were sent back"
        encode(comfy, other, PROMPT)  # ComfyUI drops l_only (a clone of this model) without unloading it
        assert sent_back == ["sd15"]
        mm.unload_all_models()  # ComfyUI frees the GPU: every tower goes back
        assert sorted(sent_back) == ["clip_g", "clip_l", "sd15", "sd15 again"]
        sent_back.clear()
        monkeypatch.setattr(q.patcher, "is_dynamic", lambda: True, raising=False)  # v0.29's dynamic VRAM
        encode(comfy, q, PROMPT)
        encode(comfy, l_only, PROMPT)
        assert sorted(sent_back) == ["clip_g", "clip_l"]
    finally:
        for n, t in towers.items():
            object.__setattr__(t, "offload_device", saved[n])
            proxy._RESIDENT.discard(t)


def test_sd3_clip_pair_from_dualcliploader(comfy):
    clip = call(comfy, "DualCLIPLoader", clip_name1=comfy.files["clip_l"], clip_name2=comfy.files["clip_g"],
                type="sd3")[0]
    out = quantize(comfy, clip, calibration_prompts=CAL_FEW, evaluation_prompts=EVAL_ONE)
    q, report = out["result"]
    # no T5 was loaded, and the report says what the bundle holds
    assert report.startswith("FP8 E4M3 CLIP quality report: SD3 (CLIP-L + CLIP-G), weights+activations")
    rc, rp = encode(comfy, clip, PROMPT)
    gc, gp = encode(comfy, q, PROMPT)
    assert rc.shape == gc.shape and rc.shape[-1] == 4096 and rp.shape == gp.shape == (1, 2048)
    assert cosine(rc[..., :2048], gc[..., :2048]) > 0.99 and cosine(rp, gp) > 0.99
    assert torch.equal(rc[..., 2048:], gc[..., 2048:])  # the zero padding where T5's width goes


def flux_clip(comfy):
    """ComfyUI's own Flux text-encoder bundle: the CLIP-L fixture plus a reduced, seeded T5-XXL."""
    from comfy.sd import CLIP
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import flux
    from comfy.utils import load_torch_file

    tiny_t5 = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32}
    target = ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    clip = CLIP(target, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"),
                         model_options={"t5xxl_model_config": tiny_t5})
    sd = load_torch_file(comfy.folder_paths.get_full_path("text_encoders", comfy.files["clip_l"]),
                                     safe_load=True)
    clip.load_sd(sd)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in clip.cond_stage_model.t5xxl.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return clip


def test_sd3_report_measures_clip_l_apart_from_t5s_unchanged_tokens(comfy, pack):
    """SD3's conditioning appends T5's tokens, which quantization leaves as they are: the report scores the CLIP-L
    tower on its own and the threshold applies to that score (the stress CLIP-L: 0.983 alone, 0.9915 whole)."""
    import dataclasses

    from comfy.sd import CLIP
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd3_clip
    from comfy.utils import load_torch_file

    tiny_t5 = {"d_model": 4096, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 32}  # SD3 joins 4096 wide
    clip = CLIP(ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=True)),
                embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"),
                model_options={"t5xxl_model_config": tiny_t5})
    clip.load_sd(load_torch_file(comfy.folder_paths.get_full_path("text_encoders", comfy.files["clip_l_stress"]),
                                 safe_load=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in clip.cond_stage_model.t5xxl.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    held_out = ["a photo of a dog on the beach", "an oil painting of a ship"]
    with torch.inference_mode():
        q, report = pack_module(pack, "quant.calibrate").quantize_clip(clip, CAL.splitlines(), held_out=held_out)
    text = report.text()
    print("\n" + text)
    assert "t5xxl: passed through unchanged" in text and "holds t5xxl's output too" in text
    tower = min(report.towers[0].cond)
    assert re.search(rf"clip_l alone: hidden {tower:.4f}", text)
    # what the report says of the tower is what the CLIP-L rows of the conditioning lost
    rows = []
    for p in held_out:
        rc, gc = encode(comfy, clip, p)[0], encode(comfy, q, p)[0]
        rows.append(float(torch.nn.functional.cosine_similarity(rc[0, :77], gc[0, :77], dim=-1).mean()))
    assert abs(min(rows) - tower) < 1e-4
    # SD3's pooled output is CLIP-L's unprojected one (and CLIP-G's zeros here): the tower's pooled line scores it
    assert abs(min(report.towers[0].pooled) - report.pooled_min) < 1e-5
    assert tower < report.cond_min  # T5's unchanged tokens lift the whole conditioning's score
    warned = dataclasses.replace(report, min_cosine=(tower + report.cond_min) / 2).warnings()
    assert len(warned) == 1 and f"clip_l hidden {tower:.5f}" in warned[0]


def test_flux_clip_l_quantized_t5_passed_through(comfy):
    clip = flux_clip(comfy)
    out = quantize(comfy, clip, calibration_prompts=CAL, evaluation_prompts=EVAL)
    q, report = out["result"]
    assert report.startswith("FP8 E4M3 CLIP quality report: Flux (CLIP-L + T5)")
    assert "t5xxl: passed through unchanged (not a CLIP tower)" in report
    rc, rp = encode(comfy, clip, PROMPT)
    gc, gp = encode(comfy, q, PROMPT)
    assert torch.equal(rc, gc)  # Flux conditions on T5: untouched
    assert float(torch.nn.functional.cosine_similarity(rp, gp)) > 0.99  # pooled comes from the FP8 CLIP-L


def test_sdxl_on_tensorrt_engines_encodes_like_its_fp8_towers(comfy, pack, sdxl, engine_node):
    """Both towers through the TensorRT node: real export and TensorRT for RTX builds (CLIP-G: 32 layers,
    GELU), the engines' graphs executed by onnxruntime (no engine can run on this machine)."""
    from conftest import pack_module

    clip, q, _ = sdxl
    out, status = call(comfy, "FP8CLIPTensorRTEngine", clip=q, max_batch_rows=2)
    assert len(engine_node) == 2 and "clip_l: built in" in status and "clip_g: built in" in status
    towers = pack_module(pack, "quant.artifact").quantized_towers(out)
    assert sorted(type(m).__name__ for m, _ in towers.values()) == ["EngineTextModel", "EngineTextModel"]
    (rc, rp), (gc, gp) = encode(comfy, q, PROMPT), encode(comfy, out, PROMPT)
    assert gc.shape == (1, 77, 2048) and gp.shape == (1, 1280)
    oc = encode(comfy, clip, PROMPT)[0]
    print(f"\nSDXL engines vs PyTorch FP8: conditioning {cosine(gc, rc):.5f}, pooled {cosine(gp, rp):.5f}; "
          f"vs the original: engines {cosine(gc, oc):.5f}, PyTorch FP8 {cosine(rc, oc):.5f}")
    # 32 FP8 layers of CLIP-G amplify rounding-boundary flips between two exact implementations: the engine
    # graph is as close to the original encoder as the PyTorch FP8 towers are.
    assert cosine(gc, rc) > 0.998 and cosine(gp, rp) > 0.997
    assert cosine(gc, oc) > cosine(rc, oc) - 0.002


def test_a_bundle_built_on_sd1s_class_is_not_called_sd15_and_its_other_encoders_are_named(pack):
    """ComfyUI v0.29's Kandinsky 5 text encoder derives from SD1ClipModel (through Qwen-Image's) and holds
    clip_l beside a Qwen encoder: the report called it "SD1.5 (CLIP-L)" and did not say the Qwen output, which is
    its conditioning, passed through."""
    from types import SimpleNamespace

    towers = pack_module(pack, "quant.towers")

    def bundle(cls_name: str, **others) -> SimpleNamespace:
        sd1 = type("SD1ClipModel", (torch.nn.Module,), {})
        csm = (sd1 if cls_name == "SD1ClipModel" else type(cls_name, (sd1,), {}))()
        csm.clip_l = torch.nn.Module()
        csm.clip_l.transformer = torch.nn.Module()
        csm.clip_l.transformer.text_model = torch.nn.Module()
        csm.clip_l.transformer.text_model.encoder = torch.nn.Module()
        for name, module in others.items():
            setattr(csm, name, module)
        patcher = SimpleNamespace(get_model_object=lambda path: csm.get_submodule(path))
        return SimpleNamespace(patcher=patcher, cond_stage_model=csm, tokenize=None, encode_from_tokens=None)

    family, _ = towers.text_family(bundle("SD1ClipModel"))
    assert family.label == "SD1.5 (CLIP-L)" and family.passed_through == () and not family.pooled_used
    family, _ = towers.text_family(bundle("Kandinsky5TEModel_", qwen25_7b=torch.nn.Linear(2, 2)))
    assert family.label == "Kandinsky5TEModel_ (CLIP-L + qwen25_7b)" and family.passed_through == ("qwen25_7b",)


def sd2_clip(comfy, layers: int = 4):
    """ComfyUI's own SD2.x text-encoder bundle (OpenCLIP ViT-H/14 text tower, penultimate layer) at 4 of its 24
    layers, seeded; a file would need all 24 for ComfyUI's loaders to recognise it as CLIP-H."""
    from comfy.sd import CLIP
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd2_clip as sd2
    from harness import fixtures

    target = ClipTarget(sd2.SD2Tokenizer, sd2.SD2ClipModel)
    clip = CLIP(target, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"),
                model_options={"clip_h_model_config": {"num_hidden_layers": layers}})
    sd = fixtures.clip_text_state_dict(fixtures.CLIP_H_TEXT, seed=40, num_hidden_layers=layers)
    missing, unexpected = clip.load_sd(sd)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return clip


def test_sd2_clip_h_quantized_with_its_penultimate_layer_kept(comfy):
    clip = sd2_clip(comfy)
    out = quantize(comfy, clip, calibration_prompts=CAL_FEW, evaluation_prompts=EVAL_ONE)
    q, report = out["result"]
    assert report.startswith("FP8 E4M3 CLIP quality report: SD2 (CLIP-H), ")
    assert "clip_h: 24 Linear layers in FP8" in report  # 4 layers x 6; the projection kept by default
    rc, rp = encode(comfy, clip, PROMPT)
    gc, gp = encode(comfy, q, PROMPT)
    assert rc.shape == gc.shape == (1, 77, 1024) and rp.shape == gp.shape == (1, 1024)
    # SD2 conditions on the penultimate layer: the FP8 clone must take that one, not the last
    last = call(comfy, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-1)[0]
    lc = encode(comfy, last, PROMPT)[0]
    print(f"\nSD2 CLIP-H, 4 layers: FP8 vs original {cosine(gc, rc):.5f}, vs the original's last layer "
          f"{cosine(gc, lc):.5f}")
    assert cosine(gc, rc) > 0.99 and cosine(gc, lc) < cosine(gc, rc) - 0.01


def test_a_quantized_tower_goes_back_when_the_original_clip_loads_in_its_place(comfy, pack, fp8_clip, monkeypatch):
    """Encoding with the original CLIP after its FP8 clone (the Compare workflow does) makes ComfyUI drop the
    FP8 clone without unloading it; its tower stayed on the GPU, where "Unload Models" could not reach it, until
    another quantized model ran (bench/results/residency_h100.md). ComfyUI moves the model to the offload device
    with the tower still patched in at that moment: the tower now follows. The same clone encoding again moves
    nothing. No GPU here: the tower's load device is made to differ, and moves are recorded instead of made."""
    proxy = pack_module(pack, "quant.proxy")
    original, q = fp8_clip[0], fp8_clip[1]
    tower = q.patcher.object_patches["clip_l.transformer"]
    sent_back: list[int] = []

    def record(self):
        if self in proxy._RESIDENT:
            sent_back.append(id(self))
        proxy._RESIDENT.discard(self)

    monkeypatch.setattr(proxy.TowerProxy, "offload_now", record)
    monkeypatch.setattr(proxy.TowerProxy, "place", lambda self, device: None)
    monkeypatch.setattr(proxy.TowerProxy, "retarget", lambda self, *devices: None)  # keep the stand-in device
    saved = tower.load_device
    object.__setattr__(tower, "load_device", torch.device("meta"))
    try:
        for _ in range(2):
            encode(comfy, q, PROMPT)
        assert tower in proxy._RESIDENT and sent_back == [], "the FP8 clone running again sent its tower back"
        encode(comfy, original, PROMPT)
        assert sent_back == [id(tower)], "the tower stayed resident after the original CLIP loaded in its place"
    finally:
        object.__setattr__(tower, "load_device", saved)
        proxy._RESIDENT.discard(tower)


def test_a_clone_set_to_run_elsewhere_takes_the_tower_with_it(comfy, pack, fp8_clip, monkeypatch):
    """v0.29's Select CLIP Device retargets a clone of the quantized CLIP (the CPU, another GPU). The clone shares
    the tower's proxy, which kept the devices it was made with: the tower ran and stayed on the old GPU, where no
    loaded model accounted for it (found by review in ComfyUI's model management with a stand-in GPU). Here the
    tower's GPU is 'meta' and the clone is set to the CPU, as that node does; moves are recorded."""
    proxy = pack_module(pack, "quant.proxy")
    q = fp8_clip[1]
    tower = q.patcher.object_patches["clip_l.transformer"]
    sent_back: list[str] = []

    def record(self):
        if self in proxy._RESIDENT:
            sent_back.append(str(self.load_device))
        proxy._RESIDENT.discard(self)

    monkeypatch.setattr(proxy.TowerProxy, "offload_now", record)
    monkeypatch.setattr(proxy.TowerProxy, "place", lambda self, device: None)
    # The FP8 model places itself on its own load device at each call (it moved straight back to the old GPU,
    # found by review): record where it is asked to run, without moving anything.
    asked: list[str] = []
    monkeypatch.setattr(tower.impl, "_place", lambda device: asked.append(str(device)) or torch.device("cpu"))
    saved = tower.load_device, tower.offload_device, tower.impl.load_device
    object.__setattr__(tower, "load_device", torch.device("meta"))
    tower.impl.load_device = torch.device("meta")
    try:
        proxy._RESIDENT.add(tower)  # as after an encode on its GPU
        moved = q.clone()
        moved.patcher.load_device = moved.patcher.offload_device = torch.device("cpu")
        encode(comfy, moved, PROMPT)
        assert tower.load_device == torch.device("cpu") and sent_back == ["meta"] and asked == ["cpu"]
    finally:
        object.__setattr__(tower, "load_device", saved[0])
        object.__setattr__(tower, "offload_device", saved[1])
        tower.impl.load_device = saved[2]
        proxy._RESIDENT.discard(tower)
