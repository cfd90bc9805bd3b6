"""The quantize node in a real ComfyUI: quality, report, and that the FP8 CLIP drops into stock nodes."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import call, cosine, encode, pack_module, record_tower_loads_and_folds
from harness.host import PACK_DIR

PROMPT = "a photo of an astronaut riding a horse, detailed, 4k"


def quantize(comfy, clip, **kw):
    n = comfy.nodes.NODE_CLASS_MAPPINGS["FP8CLIPQuantize"]
    args = {k: v.get("default") if isinstance(v, dict) else v[0][0]
            for k, (t, *rest) in n.INPUT_TYPES()["required"].items() if k != "clip"
            for v in [rest[0] if rest else {}]}
    args.update(kw)
    with torch.inference_mode():
        out = n().quantize(clip=clip, **args)
    return out


def test_defaults_calibrate_on_builtin_prompts_and_report(quantized, pack):
    qclip, text, out = quantized
    assert out["ui"]["text"] == [text]
    assert "64 prompts" in text
    m = re.search(r"conditioning\s+([\d.]+) / ([\d.]+)", text)
    cmin, cmean = float(m.group(1)), float(m.group(2))
    assert 0.99 <= cmin <= cmean < 1.0  # FP8 changes the numbers, but not by much
    m = re.search(r"pooled\s+([\d.]+) / ([\d.]+)", text)
    assert 0.99 <= float(m.group(1)) < 1.0
    assert "clip_l: 72 Linear layers in FP8; kept in high precision: clip_l.text_projection" in text
    assert "WARNING" not in text


def test_quantized_clip_encodes_close_to_original_but_not_equal(comfy, clip, quantized):
    qclip = quantized[0]
    ref, got = encode(comfy, clip, PROMPT), encode(comfy, qclip, PROMPT)
    assert ref[0].shape == got[0].shape == (1, 77, 768) and got[1].shape == (1, 768)
    assert 0.99 < cosine(ref[0], got[0]) < 1.0
    assert not torch.equal(ref[0], got[0])


def test_input_clip_and_its_other_clones_are_untouched(comfy, clip, quantized):
    before = encode(comfy, clip, PROMPT)[0]
    other = clip.clone()
    encode(comfy, quantized[0], PROMPT)  # the quantized clone was loaded last
    assert torch.equal(encode(comfy, clip, PROMPT)[0], before)
    assert torch.equal(encode(comfy, other, PROMPT)[0], before)
    assert not any("fp8clip" in repr(type(v)) for v in clip.patcher.object_patches.values())


def test_clip_skip_through_clipsetlastlayer(comfy, clip, quantized):
    (ref_skip,) = call(comfy, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)
    (q_skip,) = call(comfy, "CLIPSetLastLayer", clip=quantized[0], stop_at_clip_layer=-2)
    r, q = encode(comfy, ref_skip, PROMPT)[0], encode(comfy, q_skip, PROMPT)[0]
    last = encode(comfy, clip, PROMPT)[0]
    assert cosine(r, q) > 0.99
    assert cosine(r, last) < cosine(r, q) - 0.01  # clip skip really selected another layer


def test_prompt_weighting(comfy, clip, quantized):
    text = "a (red:1.5) balloon over a (grey:0.6) city"
    r, q = encode(comfy, clip, text)[0], encode(comfy, quantized[0], text)[0]
    plain_r = encode(comfy, clip, "a red balloon over a grey city")[0]
    plain_q = encode(comfy, quantized[0], "a red balloon over a grey city")[0]
    assert cosine(r, q) > 0.99
    # the weights' effect on the conditioning (weighted minus plain) is reproduced by the FP8 CLIP
    d_ref, d_q = (r - plain_r).flatten(), (q - plain_q).flatten()
    assert d_ref.norm() > 0.05 * r.norm()
    assert float(torch.nn.functional.cosine_similarity(d_ref, d_q, dim=0)) > 0.95


def test_long_prompt_over_77_tokens(comfy, clip, quantized):
    text = ", ".join(f"detail number {i}" for i in range(60))  # ~240 tokens: 4 rows of 77
    r, q = encode(comfy, clip, text)[0], encode(comfy, quantized[0], text)[0]
    assert r.shape == q.shape and r.shape[1] >= 3 * 77
    assert cosine(r, q) > 0.99


def test_textual_inversion_embedding(comfy, clip, quantized):
    emb = comfy.files["embedding"].rsplit(".", 1)[0]
    text = f"a portrait in the style of embedding:{emb}"
    r, q = encode(comfy, clip, text)[0], encode(comfy, quantized[0], text)[0]
    without = encode(comfy, clip, "a portrait in the style of")[0]
    assert cosine(r, q) > 0.99
    assert cosine(r, without) < cosine(r, q) - 0.005  # the embedding changed the conditioning


def test_lora_applied_before_quantizing_is_kept(comfy, clip):
    # LoraLoader with no MODEL, as a CLIP-only LoRA chain does
    _, lclip = call(comfy, "LoraLoader", model=None, clip=clip, lora_name=comfy.files["lora"],
                    strength_model=0.0, strength_clip=1.0)
    base = encode(comfy, clip, PROMPT)[0]
    with_lora = encode(comfy, lclip, PROMPT)[0]
    assert cosine(base, with_lora) < 0.98  # the LoRA matters
    qlora = quantize(comfy, lclip, calibration_prompts="a cat\na castle at night\n(a red car:1.2)")["result"][0]
    got = encode(comfy, qlora, PROMPT)[0]
    assert cosine(with_lora, got) > 0.99
    assert cosine(base, got) < cosine(with_lora, got) - 0.01
    # and the base CLIP still encodes without the LoRA, the LoRA clone with it
    assert torch.equal(encode(comfy, clip, PROMPT)[0], base)
    assert torch.equal(encode(comfy, lclip, PROMPT)[0], with_lora)
    assert torch.equal(encode(comfy, qlora, PROMPT)[0], got)


def test_quantizing_loads_the_model_a_few_times_not_once_per_prompt(comfy, clip, monkeypatch):
    """A switch between the input CLIP and the quantized clone makes ComfyUI load the model again (the input then
    runs with its own towers' weights on the GPU). Calibration and the quality report must not alternate the two
    per prompt: with Flux's 9.5 GB T5-XXL beside the CLIP-L that moved the whole model twice a prompt, and
    quantizing did not finish in 8 minutes on an H100 (18 s now). Outputs stay exact across the reloads."""
    patcher_cls = importlib.import_module("comfy.model_patcher").ModelPatcher
    reloads = []
    unpatch = patcher_cls.unpatch_model

    def spy(self, device_to=None, unpatch_weights=True):
        if unpatch_weights and getattr(self.model, "current_weight_patches_uuid", None) is not None:
            reloads.append(self)
        return unpatch(self, device_to, unpatch_weights)

    monkeypatch.setattr(patcher_cls, "unpatch_model", spy)
    q = quantize(comfy, clip, calibration_prompts="a cat\na house\na red car\nan old fisherman")["result"][0]
    assert len(reloads) <= 4, f"{len(reloads)} model reloads to calibrate on 4 prompts and score 24"
    first = [encode(comfy, c, PROMPT)[0] for c in (clip, q)]
    for _ in range(2):
        assert [torch.equal(encode(comfy, c, PROMPT)[0], f) for c, f in zip((clip, q), first)] == [True] * 2


def test_calibrating_prompts_together_gives_the_scales_of_one_by_one(comfy, clip, pack, monkeypatch):
    """Calibration runs 16 prompts per transformer call (their rows as one batch). The scales must be those of
    prompt-by-prompt calibration, with weighted, long and textual-inversion prompts among them."""
    cal = "\n".join(["a cat", "(a castle:1.3) at (night:0.8)", ", ".join(f"detail {i}" for i in range(40)),
                     "embedding:fp8clip-fixture-emb a portrait", "a red car", "blurry, lowres"])
    calibrate = pack_module(pack, "quant.calibrate")
    out, rows = {}, {}
    real = calibrate.encode_together
    monkeypatch.setattr(calibrate, "encode_together", lambda c, ps: (rows[key].append(
        sum(1 + max(len(r) for k, r in c.tokenize(p).items() if k == "l") for p in ps)), real(c, ps))[1])
    # prompt by prompt; 16 prompts a call; at most 4 rows a call (the 40-detail prompt's 2 rows + 1 go alone)
    for key, (n, max_rows) in {"one by one": (1, 64), "together": (16, 64), "row cap": (16, 4)}.items():
        monkeypatch.setattr(calibrate, "PROMPTS_PER_CALIBRATION_ENCODE", n)
        monkeypatch.setattr(calibrate, "ROWS_PER_CALIBRATION_ENCODE", max_rows)
        rows[key] = []
        pack_module(pack, "quant.calibration_memo").forget_all()  # same inputs: calibrate, do not recall
        q = quantize(comfy, clip, calibration_prompts=cal, evaluation_prompts="a house", runtime="fake-quant")
        out[key] = [encode(comfy, q["result"][0], p)[0] for p in (PROMPT, "(a castle:1.3) at night")]
    assert len(rows["one by one"]) == 6 and len(rows["together"]) == 1 and max(rows["row cap"]) <= 4
    assert all(torch.equal(a, b) for v in out.values() for a, b in zip(out["one by one"], v))


def test_quantizing_again_while_a_quantized_clone_is_loaded(comfy, clip, pack):
    """Changing a widget and running again must start from the original weights, not the last FP8 copy, whether
    the calibration is remembered or run again."""
    kw = dict(calibration_prompts="a cat\na house", evaluation_prompts="a dog")
    q1 = quantize(comfy, clip, **kw)["result"][0]
    first = encode(comfy, q1, PROMPT)[0]  # q1 is now patched into the shared model
    q2 = quantize(comfy, clip, min_cosine=0.5, **kw)["result"][0]
    assert torch.equal(encode(comfy, q2, PROMPT)[0], first)
    pack_module(pack, "quant.calibration_memo").forget_all()
    q3 = quantize(comfy, clip, **kw)["result"][0]
    assert torch.equal(encode(comfy, q3, PROMPT)[0], first)


def test_changing_only_the_runtime_or_threshold_does_not_calibrate_again(comfy, clip, pack, monkeypatch):
    """ComfyUI runs the node again for any widget change. A new runtime or min_cosine must not pay for another
    calibration and report (minutes for SDXL on a CPU): the same scales and scores come back, the report says so
    and applies the new threshold, and the model is the one a fresh calibration gives, bit for bit. New prompts,
    a new recipe or another CLIP (CLIPSetLastLayer's clone) calibrate again."""
    calibrate = pack_module(pack, "quant.calibrate")
    calls = []
    for name in ("encode_together", "evaluate"):
        real = getattr(calibrate, name)
        monkeypatch.setattr(calibrate, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    kw = dict(calibration_prompts="a cat\na castle at night\n(a red car:1.2)",
              evaluation_prompts="a house by a lake\nportrait of an old fisherman")
    first = quantize(comfy, clip, runtime="fake-quant", **kw)["result"]
    assert calls == ["encode_together", "evaluate"] and "reused" not in first[1]
    want = encode(comfy, first[0], PROMPT)[0]

    calls.clear()
    events = record_tower_loads_and_folds(pack, monkeypatch)
    strict = quantize(comfy, clip, runtime="fake-quant", min_cosine=0.9999, **kw)["result"]
    assert calls == []
    assert events[:2] == ["load", "fold"]  # rebuilt where it runs (the GPU), not on the CPU before it moves there
    assert "Calibration and report reused from the run at" in strict[1]
    assert "WARNING: Quality below your threshold 0.9999" in strict[1] and "WARNING" not in first[1]
    assert torch.equal(encode(comfy, strict[0], PROMPT)[0], want)
    fp8 = quantize(comfy, clip, runtime="fp8", **kw)["result"]
    assert calls == [] and "Runtime: fp8" in fp8[1] and "reused from" in fp8[1]
    assert float(re.search(r"worst conditioning cosine ([\d.]+)", fp8[1]).group(1)) >= 0.999

    for changed in (dict(kw, calibration_prompts="a cat\na castle at night"), dict(kw, keep_high_precision="*text_projection, *layers.11.*"),
                    dict(kw, evaluation_prompts="a house by a lake")):
        calls.clear()
        quantize(comfy, clip, runtime="fake-quant", **changed)
        assert calls == ["encode_together", "evaluate"], changed
    (skip,) = call(comfy, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)
    calls.clear()
    assert "reused" not in quantize(comfy, skip, runtime="fake-quant", **kw)["result"][1]
    assert calls == ["encode_together", "evaluate"]


def test_an_embedding_file_or_a_clip_skip_changed_since_calibrates_again(comfy, pack, scratch, monkeypatch):
    """The remembered calibration is keyed by what the encoder sees, not by the prompt text: an `embedding:` file
    added after a run (ComfyUI had dropped the name) changes the calibration data, and a clip skip set on the
    same CLIP object in place (custom nodes do; CLIPSetLastLayer clones) changes the report's scores. Both were
    served the earlier run's calibration and report. A missing embedding is named in the report (ComfyUI only
    logged it)."""
    from safetensors.torch import save_file

    calibrate = pack_module(pack, "quant.calibrate")
    calls = []
    real = calibrate.encode_together
    monkeypatch.setattr(calibrate, "encode_together", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    (clip,) = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")
    kw = dict(runtime="fake-quant", calibration_prompts="embedding:fp8clip-late a portrait\na cat",
              evaluation_prompts="a house by a lake")
    first = quantize(comfy, clip, **kw)["result"][1]
    # ComfyUI only logs a missing embedding and drops the name; the report says it, with the fix
    assert ("Not found, so left out of the prompts as CLIPTextEncode leaves them out: embedding:fp8clip-late. Put "
            "the file in models/embeddings, or fix the name.") in first
    path = scratch(comfy.base / "models" / "embeddings" / "fp8clip-late.safetensors")
    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(1)) * 2.0}, str(path))
    calls.clear()
    again = quantize(comfy, clip, min_cosine=0.5, **kw)["result"]
    assert calls == [1] and "reused" not in again[1] and "Not found" not in again[1]

    calls.clear()
    clip.clip_layer(-6)  # in place: the same object, the same patches
    skipped = quantize(comfy, clip, min_cosine=0.5, **kw)["result"]
    assert calls == [1] and "reused" not in skipped[1]
    calls.clear()
    assert "reused from" in quantize(comfy, clip, min_cosine=0.4, **kw)["result"][1] and calls == []


def test_a_missing_embedding_is_named_when_comfyui_logs_only_errors(comfy, pack, clip):
    """`--verbose ERROR` raises the root logger's level, so ComfyUI's warning about a missing `embedding:` file is
    never made: the report must not depend on it. Only this thread's lookups count, and the tokenizer is left as
    it was (a deep copy made later must not call back into this one)."""
    import logging
    import threading

    calibrate = pack_module(pack, "quant.calibrate")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # what --verbose ERROR does
    try:
        with calibrate.missing_embeddings(clip) as missing:
            calibrate.token_key(clip, "embedding:fp8clip-nope, a cat embedding:fp8clip-nope")
            other = threading.Thread(target=lambda: clip.tokenize("embedding:fp8clip-other-thread a dog"))
            other.start()
            other.join()
    finally:
        root.setLevel(level)
    assert missing == ["fp8clip-nope"]
    assert not any("_try_get_embedding" in vars(t) for t in calibrate._word_tokenizers(clip.tokenizer))


def test_lora_after_quantizing_is_refused_not_ignored(comfy, quantized):
    """A LoRA applied to the FP8 CLIP cannot be baked into FP8 weights: say so instead of dropping it."""
    _, lq = call(comfy, "LoraLoader", model=None, clip=quantized[0], lora_name=comfy.files["lora"],
                 strength_model=0.0, strength_clip=1.0)
    with pytest.raises(Exception, match="Apply LoRAs to the CLIP before the Quantize node"):
        encode(comfy, lq, PROMPT)


def test_lora_hooks_are_refused_on_the_quantized_clip_and_on_its_input(comfy, clip, quantized):
    """Create Hook LoRA -> Set CLIP Hooks patches weights in place at each encode, which FP8 weights cannot follow:
    after the node it would be silently ignored, before it only half applied. Both stop with the fix."""
    plain = encode(comfy, quantized[0], PROMPT)[0]
    (hooks,) = call(comfy, "CreateHookLora", lora_name=comfy.files["lora"], strength_model=1.0, strength_clip=1.0)
    (after,) = call(comfy, "SetClipHooks", clip=quantized[0], apply_to_conds=True, schedule_clip=False, hooks=hooks)
    with pytest.raises(Exception, match=r"patched by hooks.*apply the LoRA with 'Load LoRA' before the Quantize node"):
        encode(comfy, after, PROMPT)
    (before,) = call(comfy, "SetClipHooks", clip=clip, apply_to_conds=True, schedule_clip=False, hooks=hooks)
    with pytest.raises(ValueError, match=r"has hooks that patch \d+ weights of its clip_l tower.*'Load LoRA'"):
        quantize(comfy, before)
    assert torch.equal(encode(comfy, quantized[0], PROMPT)[0], plain)  # the un-hooked clone is as it was


FIRST_IMPORT = """
import gc, sys, weakref
import torch
sys.path.insert(0, sys.argv[1])
from quant import modelopt_bridge

class CalibrationCopy:  # stands in for what the quantize node holds when it first needs ModelOpt
    pass

def quantize_node():
    copy = CalibrationCopy()
    modelopt_bridge.register_linear_classes(torch.nn.Linear(2, 2))  # imports ModelOpt
    return weakref.ref(copy)

ref = quantize_node()
gc.collect()
print("freed" if ref() is None else "kept alive")
"""


def test_the_first_modelopt_import_does_not_keep_the_quantize_nodes_memory():
    """ModelOpt's import stores exceptions (with tracebacks, so with every caller's frame) for the life of the
    process: imported from the node's frames, it kept the first calibration's model copy (GBs for SDXL)
    until ComfyUI exited. A fresh process, where ModelOpt is not imported yet."""
    r = subprocess.run([sys.executable, "-c", FIRST_IMPORT, str(PACK_DIR)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "freed"


class _LoaderState:
    """Stands in for what ComfyUI v0.29's dynamic-VRAM loader hangs on the modules of a CLIP that has encoded
    (virtual VRAM allocations, registered host buffers): copying it fails as the real thing does on a GPU."""

    def __deepcopy__(self, memo):
        raise RuntimeError("CUDA error: invalid argument")


def test_quantizing_a_clip_that_dynamic_vram_has_loaded(comfy, pack, clip):
    """On NVIDIA GPUs ComfyUI v0.29 loads models with dynamic VRAM by default; quantizing a CLIP that already
    encoded (re-running with other widgets, or after a plain CLIPTextEncode) must not copy its loader state."""
    tower = clip.patcher.get_model_object("clip_l.transformer")
    linears = [m for m in tower.modules() if hasattr(m, "comfy_cast_weights")]
    state = {"weights": (_LoaderState(), [linears[0]])}
    attrs = ("_v", "_v_weight", "_pin_state", "weight_lowvram_function", "_v_dirty")
    for m in linears:
        m._v, m._v_weight, m._pin_state, m.weight_lowvram_function = _LoaderState(), _LoaderState(), state, None
        m._v_dirty = True  # a shared object: the copy must keep the model's other True flags
    try:
        q = quantize(comfy, clip, calibration_prompts="a cat\na house")["result"][0]
        got = encode(comfy, q, PROMPT)[0]
        copy_ = importlib.import_module(f"{pack.__name__}.quant.patching").module_copy(tower)
        assert not any(a in m.__dict__ for m in copy_.modules() for a in attrs)
        for a, b in zip(tower.modules(), copy_.modules()):  # the model's own flags survive (True included)
            assert {k: v for k, v in a.__dict__.items() if isinstance(v, bool) and k not in attrs} == \
                {k: v for k, v in b.__dict__.items() if isinstance(v, bool)}
    finally:
        for m in linears:
            for a in attrs:
                m.__dict__.pop(a, None)
    assert cosine(encode(comfy, clip, PROMPT)[0], got) > 0.99


def test_compare_conditioning_of_a_combined_conditioning_gives_its_worst_entry(comfy, clip):
    """ConditioningCombine makes one CONDITIONING of several entries: the node scores each pair and reports the
    lowest, so one bad entry is not averaged away."""
    def enc(text):
        return call(comfy, "CLIPTextEncode", clip=clip, text=text)[0]

    a, b, other = enc("a lighthouse at sunrise"), enc("a red fox in the snow"), enc("a red fox in the rain")
    ref = call(comfy, "ConditioningCombine", conditioning_1=a, conditioning_2=b)[0]
    cand = call(comfy, "ConditioningCombine", conditioning_1=a, conditioning_2=other)[0]
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FP8CLIPCompareConditioning"]()
    combined = node.compare(ref, cand)["result"]
    alone = node.compare(b, other)["result"]
    assert len(ref) == 2 and combined[0] == alone[0] < 0.999 and combined[1] == alone[1]
    assert node.compare(a, a)["result"][0] > 0.99999


class PromptList:
    """Stands in for prompt-batch nodes (one prompt per item of a list output); '|' separates the items."""
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_IS_LIST = "tests", "run", ("STRING",), (True,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}

    def run(self, text):
        return (text.split("|"),)


def test_a_prompt_list_wired_in_calibrates_once_on_all_its_prompts(comfy, monkeypatch):
    """ComfyUI runs a node once per item of a list input: a prompt list would have calibrated once per prompt
    and handed out as many CLIPs. A multi-line item is one prompt, as CLIPTextEncode reads it, and an item
    starting with '#' too (it was dropped as a comment line)."""
    from harness.host import run_graph

    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "TestPromptList", PromptList)
    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": comfy.files["clip_l"],
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "TestPromptList", "inputs": {"text": "a cat|a dog\non a beach|(a red car:1.2)|"
                                                                       "#1 best quality, a fox"}},
              "3": {"class_type": "TestPromptList", "inputs": {"text": "a house by a lake|a portrait"}},
              "4": {"class_type": "FP8CLIPQuantize", "inputs": {
                  "clip": ["1", 0], "calibration_prompts": ["2", 0], "evaluation_prompts": ["3", 0],
                  "keep_high_precision": "*text_projection", "method": "max", "quantize": "weights+activations",
                  "min_cosine": 0.9, "runtime": "fake-quant", "fp8_token_embedding": True}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}}
    (report,) = run_graph(comfy, prompt)["4"]["text"]
    assert "Calibration: 4 prompts" in report and "on 2 held-out prompts" in report
    # Typed into the widgets (or one string wired in): one prompt per line, '#' lines skipped, as before lists.
    prompt["4"]["inputs"].update(calibration_prompts="# my prompts\na cat\na dog on a beach\n(a red car:1.2)",
                                 evaluation_prompts="a house by a lake\n# not this one\na portrait")
    (report,) = run_graph(comfy, prompt)["4"]["text"]
    assert "Calibration: 3 prompts" in report and "on 2 held-out prompts" in report, report


def test_a_calibration_is_not_reused_once_the_models_weights_changed_in_place(comfy, pack):
    """A node that writes into the model's weights (load_sd, a merge written in place) keeps the CLIP object and
    its patches_uuid: the remembered calibration was reused, with the old scales and the old report's scores
    (cosine 0.898 against the original where the report said 0.9957; found by review). A fresh CLIP here."""
    clip = call(comfy, "CLIPLoader", clip_name=comfy.files["clip_l"], type="stable_diffusion")[0]
    kw = dict(calibration_prompts="a cat\na castle at night", evaluation_prompts="a house by a lake",
              runtime="fake-quant")
    quantize(comfy, clip, **kw)
    assert "reused" in quantize(comfy, clip, min_cosine=0.5, **kw)["result"][1]  # unchanged: reused
    fc1 = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1
    with torch.inference_mode():  # as a node does, in ComfyUI's executor
        fc1.weight.mul_(4)
        fc1.bias.mul_(4)
    again = quantize(comfy, clip, min_cosine=0.6, **kw)["result"]
    assert "reused" not in again[1]
    # scales fitted to the weights as they are now: as close to this CLIP as quantization gets
    assert cosine(encode(comfy, again[0], PROMPT)[0], encode(comfy, clip, PROMPT)[0]) > 0.99


def test_weights_only_encodes_no_prompt_to_calibrate(comfy, clip, pack, monkeypatch):
    """'weights only' keeps the activations in high precision, so its FP8 scales come from the weights alone:
    no calibration encode (64 by default: seconds on a CPU, minutes for SDXL), the prompts box may be empty, and
    editing it does not quantize again. Each scale is its weight's amax / 448."""
    calibrate, artifact = pack_module(pack, "quant.calibrate"), pack_module(pack, "quant.artifact")
    calls = []
    real = calibrate.encode_together
    monkeypatch.setattr(calibrate, "encode_together", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    pack_module(pack, "quant.calibration_memo").forget_all()
    kw = dict(quantize="weights only", evaluation_prompts="a house by a lake\nan old fisherman", runtime="fake-quant")
    q, text = quantize(comfy, clip, calibration_prompts="", **kw)["result"][:2]
    assert calls == [] and "Calibration: no prompts (weights only: scales from the weights)" in text
    record = artifact.record_of(q.patcher.get_model_object("clip_l.transformer"))
    original = clip.patcher.get_model_object("clip_l.transformer")
    assert len(record.scales) == 72 and all(s.input_scale is None for s in record.scales.values())
    for name in ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.11.mlp.fc2"):
        amax = float(original.get_submodule(name).weight.float().abs().max())
        assert record.scales[name].weight_scale == pytest.approx(amax / 448, rel=1e-6)
    want = encode(comfy, q, PROMPT)[0]
    again = quantize(comfy, clip, calibration_prompts="a cat\na castle at night", **kw)["result"]
    assert calls == [] and "(same model, recipe and evaluation data; weights only uses no calibration data)" in again[1]
    assert torch.equal(encode(comfy, again[0], PROMPT)[0], want)


@pytest.mark.parametrize("method", ["max", "mse"])
def test_weights_only_gives_the_model_a_calibration_on_data_gave(comfy, clip, pack, monkeypatch, method):
    """Without calibration encodes, 'weights only' must give the model it gave when it still ran them: ModelOpt
    calibrates weight quantizers on the weights in both methods (mse searches over the weights alone). The
    calibration on data is put back here by a forward loop through the transformer."""
    calibrate, bridge = pack_module(pack, "quant.calibrate"), pack_module(pack, "quant.modelopt_bridge")
    artifact, recipe = pack_module(pack, "quant.artifact"), pack_module(pack, "quant.recipe")
    real = bridge.quantize
    got = {}
    for with_data in (False, True):
        pack_module(pack, "quant.calibration_memo").forget_all()

        def quantize_(module, config, loop, _data=with_data):
            def data(m):
                for seed in range(3):
                    tokens = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(seed))
                    m["clip_l"](tokens.to(next(m.parameters()).device))
            return real(module, config, data if _data and loop is None else loop)

        monkeypatch.setattr(bridge, "quantize", quantize_)
        with torch.inference_mode():
            q, _ = calibrate.quantize_clip(clip, [], recipe.Recipe(scope="weights only", method=method),
                                           held_out=["a cat"])
        tower = q.patcher.get_model_object("clip_l.transformer")
        got[with_data] = (artifact.record_of(tower).scales, {k: v.clone() for k, v in tower.state_dict().items()})
    assert got[False][0] == got[True][0]
    assert got[False][1].keys() == got[True][1].keys()
    assert all(torch.equal(got[False][1][k], got[True][1][k]) for k in got[False][1])
