"""The ONNX export of the quantized text transformer: standard FP8 Q/DQ, FP8-stored weights, and the same
function as the PyTorch FP8 encoder when onnxruntime runs it on the CPU.

Thresholds: with float32 between the FP8 matmuls (the default, as the PyTorch FP8 path computes) the graph
matches the PyTorch encoder to >= 0.999 mean per-token cosine (measured 0.9992-0.9994); the remaining
difference is summation order in the matmuls flipping a few FP8 activation codes, which this random-weight
fixture amplifies. With float16 activations it is 0.998 (every activation rounded once more), so that variant
is checked for being as close to the unquantized encoder as the PyTorch FP8 path is. Where no activation is
rounded to FP8 (the "weights only" recipe) the graph is exact (>= 0.99999).
"""
from __future__ import annotations

import onnx
import pytest
import torch

from conftest import CALIBRATION_SMALL, cosine, encode, pack_module
from test_quantize_clip import quantize


def tower(pack, clip):
    ((module, record),) = pack_module(pack, "quant.artifact").quantized_towers(clip).values()
    return module, record


def prompt_embeds(comfy, clip, module, prompts):
    """The token embeddings ComfyUI feeds the transformer for `prompts` (through its own encode path)."""
    seen = []
    h = module.register_forward_hook(lambda m, a, kw, o: seen.append(kw["embeds"].clone()), with_kwargs=True)
    try:
        for p in prompts:
            encode(comfy, clip, p)
    finally:
        h.remove()
    return torch.cat(seen)


PROMPTS = ["a photo of a dog running on the beach", "a (red:1.4) balloon over a (grey:0.7) city",
           "an oil painting of a sailing ship in a storm, " * 6]


def test_graph_is_standard_fp8_qdq_with_fp8_weights(pack, fp8_clip):
    ox = pack_module(pack, "trt_runtime.onnx_export")
    module, record = tower(pack, fp8_clip[1])
    model = ox.export_text_transformer(module, record)
    onnx.checker.check_model(model)
    assert model.opset_import[0].domain == "" and model.opset_import[0].version >= 19
    assert {n.domain for n in model.graph.node} == {""}  # no custom (trt::) ops: onnxruntime and TensorRT read it
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 72  # every Linear input of the 12 blocks
    assert ops.count("DequantizeLinear") == 72 * 2  # those, plus the 72 FP8 weights
    fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8) == 72
    spec = ox.spec_from_module(module, record)
    linear_params = sum(lin.weight.numel() for lin in spec.linears())
    assert ox.fp8_weight_bytes(model) == linear_params + 1  # 1 byte per weight (+ the shared zero point)
    # The spec is also made on every run of the engine node, for the cache key: it holds the FP8 codes, not a
    # float32 copy of the model (4 bytes a weight: 2.8 GB for CLIP-G, found by review)
    held = {id(t): t for lin in spec.linears() for t in vars(lin).values() if isinstance(t, torch.Tensor)}
    assert sum(t.numel() * t.element_size() for t in held.values()) < 1.1 * linear_params
    assert linear_params > 84e6  # the full-size CLIP-L encoder
    assert not any("text_projection" in t.name for t in model.graph.initializer)  # kept, and run in torch
    # the calibrated scales, as they are (scale = amax / 448), in the compute dtype
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, s in record.scales.items():
        base = name.replace(".", "/")
        assert float(inits[base + "/weight_scale"]) == pytest.approx(s.weight_scale, rel=1e-3)
        assert float(inits[base + "/input_scale"]) == pytest.approx(s.input_scale, rel=1e-3)
    io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in [*model.graph.input, *model.graph.output]}
    assert io == {"embeds": ["batch", 77, 768], "last_hidden": ["batch", 77, 768],
                  "hidden_states": ["batch", 12, 77, 768]}


def test_kept_layers_stay_unquantized(comfy, pack, fp8_clip):
    ox = pack_module(pack, "trt_runtime.onnx_export")
    q = quantize(comfy, fp8_clip[0], calibration_prompts="a cat",
                 keep_high_precision="*text_projection, *layers.11.mlp.fc2")["result"][0]
    model = ox.export_text_transformer(*tower(pack, q))
    names = {t.name: t.data_type for t in model.graph.initializer}
    assert names["text_model/encoder/layers/11/mlp/fc2/weight"] == onnx.TensorProto.FLOAT
    assert "text_model/encoder/layers/11/mlp/fc2/weight_fp8" not in names
    assert "text_model/encoder/layers/11/mlp/fc2/input_scale" not in names
    assert names["text_model/encoder/layers/11/mlp/fc1/weight_fp8"] == onnx.TensorProto.FLOAT8E4M3FN
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 71


def _run_both(comfy, pack, clip, compute_dtype):
    ox, runners = pack_module(pack, "trt_runtime.onnx_export"), pack_module(pack, "trt_runtime.runners")
    module, record = tower(pack, clip)
    embeds = prompt_embeds(comfy, clip, module, PROMPTS)
    ort = runners.OrtRunner(ox.export_text_transformer(module, record, compute_dtype=compute_dtype))
    last, hidden = ort(embeds)
    with torch.inference_mode():
        ref = module(None, None, embeds=embeds, num_tokens=[77] * len(embeds), intermediate_output="all",
                     final_layer_norm_intermediate=False, dtype=torch.float32)
    return (last, hidden), (ref[0], ref[1]), embeds


@pytest.fixture(scope="module")
def weights_only(comfy, fp8_clip):
    return quantize(comfy, fp8_clip[0], calibration_prompts=CALIBRATION_SMALL, quantize="weights only")["result"][0]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16])
def test_onnxruntime_matches_pytorch_fp8_weights_exactly(comfy, pack, weights_only, compute_dtype):
    (last, hidden), (ref_last, ref_hidden), _ = _run_both(comfy, pack, weights_only, compute_dtype)
    assert last.shape == ref_last.shape and hidden.shape == ref_hidden.shape
    floor = 0.99999 if compute_dtype == torch.float32 else 0.9999
    assert cosine(last, ref_last) >= floor
    assert min(cosine(hidden[:, i], ref_hidden[:, i]) for i in range(12)) >= floor


@pytest.mark.parametrize("runtime", [1, 2], ids=["fp8-runtime", "fake-quant-runtime"])
def test_onnxruntime_w8a8_matches_pytorch_fp8_encoder(comfy, pack, fp8_clip, runtime):
    """The graph the engine is built from (W8A8, float32 activations) against the quantize node's output."""
    (last, hidden), (ref_last, ref_hidden), _ = _run_both(comfy, pack, fp8_clip[runtime], torch.float32)
    worst_hidden = min(cosine(hidden[:, i], ref_hidden[:, i]) for i in range(12))
    print(f"\nW8A8 graph vs PyTorch ({type(tower(pack, fp8_clip[runtime])[0]).__name__}): "
          f"last {cosine(last, ref_last):.5f}, worst hidden layer {worst_hidden:.5f}")
    assert cosine(last, ref_last) >= 0.999 and worst_hidden >= 0.999


def test_float16_activations_are_as_close_to_the_original_as_the_pytorch_fp8_path(comfy, pack, fp8_clip):
    original, q, _ = fp8_clip
    (last, hidden), (ref_last, ref_hidden), embeds = _run_both(comfy, pack, q, torch.float16)
    orig = pack_module(pack, "quant.proxy").original_of(original.patcher.get_model_object("clip_l.transformer"))
    with torch.inference_mode():
        unq = orig(None, None, embeds=embeds, num_tokens=[77] * len(embeds), dtype=torch.float32)[0]
    graph_vs_orig, torch_vs_orig = cosine(last, unq), cosine(ref_last, unq)
    print(f"\nfloat16 activations: vs PyTorch FP8 {cosine(last, ref_last):.5f}; vs unquantized: graph "
          f"{graph_vs_orig:.5f}, PyTorch FP8 {torch_vs_orig:.5f}")
    assert cosine(last, ref_last) >= 0.997
    assert abs(graph_vs_orig - torch_vs_orig) <= 0.001


def test_weights_after_lora_scales_and_kept_layers_change_the_export_digest(pack, fp8_clip):
    import copy

    ox = pack_module(pack, "trt_runtime.onnx_export")
    spec = ox.spec_from_module(*tower(pack, fp8_clip[1]))
    base = spec.digest(torch.float16, True)
    assert spec.digest(torch.float16, True) == base  # deterministic
    assert spec.digest(torch.float32, True) != base
    changed = copy.deepcopy(spec)
    changed.blocks[3].fc1.stored.view(torch.uint8)[0, 0] += 1  # what a LoRA does to the weights: one FP8 step
    assert changed.digest(torch.float16, True) != base
    changed = copy.deepcopy(spec)
    changed.blocks[0].q.input_scale *= 1.01  # another calibration
    assert changed.digest(torch.float16, True) != base
    changed = copy.deepcopy(spec)
    changed.blocks[11].fc2.weight_scale = changed.blocks[11].fc2.input_scale = None  # a layer kept
    assert changed.digest(torch.float16, True) != base
