"""The quantized CLIP text or vision transformer as a standard ONNX graph with FP8 Q/DQ, written from its weights.

Why not `torch.onnx.export`: ModelOpt's modules export custom `trt::TRT_FP8*` nodes that onnxruntime cannot
load, and the graph we need is small and regular. Writing it from the weights and the calibrated scales gives
standard `QuantizeLinear`/`DequantizeLinear` (opset 19, float8e4m3fn zero point) that both onnxruntime and
TensorRT read, with the weights stored as FP8 initializers (so the engine is FP8-sized).

Graph contract (see `io_contract`): input `embeds` [batch, 77, width] float32, the token embeddings ComfyUI computes
(position embeddings are added inside, as `CLIPTextModel_` does). Outputs, float32:
- `last_hidden` [batch, 77, width]: after the final LayerNorm;
- `hidden_states` [batch, layers, 77, width]: every block's output before the final LayerNorm, so any clip
  skip (with or without the final LayerNorm) is served by a gather and a LayerNorm in torch.
The pooled output (a gather at num_tokens-1) and the text projection run in torch after the engine.

Vision graph (`VisionStem` set): input `pixel_values` [batch, 3, 224, 224] float32 (as ComfyUI's clip_preprocess
gives them; the size is the model's). The patch convolution (kept in high precision: no Q/DQ), the class token,
the position embeddings and pre_layrnorm are inside; no attention mask. Outputs as above except that
`last_hidden` is the encoder's output as is (ComfyUI's CLIPVision applies post_layernorm to the class token only,
in torch after the engine, before the visual projection).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..quant.errors import FP8ClipError
from ..quant.activations import GELUS, activation_name

EXPORT_VERSION = 1  # bump when the graph written here changes: it is part of every engine cache key
OPSET = 19  # first opset with float8 QuantizeLinear/DequantizeLinear
IR_VERSION = 9
FP8_MAX = 448.0

INPUT = "embeds"
PIXELS = "pixel_values"
LAST_HIDDEN = "last_hidden"
HIDDEN_STATES = "hidden_states"


@dataclass(frozen=True)
class TensorIO:
    name: str
    mode: str  # "input" | "output"
    dtype: str  # torch dtype name
    shape: tuple[int, ...]  # -1: dynamic (the batch)

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "dtype": self.dtype, "shape": list(self.shape)}


def io_contract(width: int, layers: int, seq: int = 77, pixels: tuple[int, int, int] | None = None
                ) -> list[TensorIO]:
    """The names, dtypes and shapes of the exported graph's inputs and outputs (and so of the engine's).

    `pixels`: (channels, height, width) of a vision graph's input; None for the text graph."""
    inp = TensorIO(INPUT, "input", "float32", (-1, seq, width)) if pixels is None else \
        TensorIO(PIXELS, "input", "float32", (-1, *pixels))
    return [inp,
            TensorIO(LAST_HIDDEN, "output", "float32", (-1, seq, width)),
            TensorIO(HIDDEN_STATES, "output", "float32", (-1, layers, seq, width))]


@dataclass
class LinearSpec:
    name: str
    stored: torch.Tensor  # [out, in] the module's weight: FP8 codes (FP8Linear) or high precision
    bias: torch.Tensor | None
    weight_scale: float | None = None  # None: kept in high precision
    input_scale: float | None = None  # None: activations not quantized
    dequantize: float | None = None  # the scale of stored FP8 codes

    @property
    def fp8(self) -> bool:
        return self.weight_scale is not None

    @property
    def weight(self) -> torch.Tensor:
        """float32, as the module computes with it (already Q->DQ for FP8 layers). Made on each use: a spec
        holding it would keep a float32 copy of the whole model (2.8 GB for CLIP-G) to compute a cache key."""
        w = self.stored.float()
        return w if self.dequantize is None else w * self.dequantize

    @property
    def codes(self) -> torch.Tensor | None:
        """The FP8 weight codes when the module stores them and the graph quantizes this layer."""
        return self.stored if self.dequantize is not None and self.fp8 else None


@dataclass
class NormSpec:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclass
class BlockSpec:
    ln1: NormSpec
    q: LinearSpec
    k: LinearSpec
    v: LinearSpec
    o: LinearSpec
    ln2: NormSpec
    fc1: LinearSpec
    fc2: LinearSpec


@dataclass
class VisionStem:
    """What a vision graph computes before the first block: patch conv, class token, pre_layrnorm."""
    patch_weight: torch.Tensor  # [width, channels, patch, patch], the values the runtime convolves with
    patch_bias: torch.Tensor | None
    class_embedding: torch.Tensor  # [width]
    pre_ln: NormSpec

    @property
    def patch(self) -> int:
        return int(self.patch_weight.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.patch_weight.shape[1])


@dataclass
class TransformerSpec:
    """Everything the graph is written from; its digest is what identifies the engine's contents."""
    width: int
    heads: int
    activation: str
    position: torch.Tensor  # [77, width]; vision: [1 + patches, width]
    blocks: list[BlockSpec]
    final_ln: NormSpec | None  # None: the graph's last_hidden is the last block's output (vision)
    meta: dict[str, Any] = field(default_factory=dict)
    stem: VisionStem | None = None  # set: a vision graph (pixels in, no causal mask)

    @property
    def kind(self) -> str:
        return "text" if self.stem is None else "vision"

    @property
    def seq(self) -> int:
        return int(self.position.shape[0])

    @property
    def pixels(self) -> tuple[int, int, int] | None:
        """(channels, height, width) of a vision graph's input, from the patch grid the positions imply."""
        if self.stem is None:
            return None
        grid = math.isqrt(self.seq - 1)
        if grid * grid != self.seq - 1:
            raise FP8ClipError(f"This vision model has {self.seq} positions, not a class token plus a square "
                               "grid of patches: the TensorRT export supports CLIP ViTs only.")
        side = grid * self.stem.patch
        return self.stem.channels, side, side

    def linears(self) -> list[LinearSpec]:
        return [lin for b in self.blocks for lin in (b.q, b.k, b.v, b.o, b.fc1, b.fc2)]

    def io(self) -> list[TensorIO]:
        return io_contract(self.width, len(self.blocks), self.seq, self.pixels)

    def digest(self, compute_dtype: torch.dtype, fp8: bool) -> str:
        """sha256 over every tensor and setting the graph is written from, plus EXPORT_VERSION."""
        h = hashlib.sha256()
        h.update(repr((EXPORT_VERSION, OPSET, self.width, self.heads, self.activation, str(compute_dtype),
                       fp8)).encode())

        def t(name: str, x: torch.Tensor | None) -> None:
            h.update(name.encode() + b"\0")
            if x is None:
                return
            x = x.detach().to("cpu").contiguous()
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.view(torch.uint8).numpy().tobytes() if x.dtype.itemsize == 1 else x.numpy().tobytes())

        def n(name: str, ln: NormSpec) -> None:
            t(name + ".w", ln.weight)
            t(name + ".b", ln.bias)
            h.update(repr(ln.eps).encode())

        if self.stem is not None:  # text digests stay as they were: cached text engines remain valid
            h.update(b"vision\0")
            t("patch.w", self.stem.patch_weight)
            t("patch.b", self.stem.patch_bias)
            t("class", self.stem.class_embedding)
            n("pre_ln", self.stem.pre_ln)
        t("position", self.position)
        for i, b in enumerate(self.blocks):
            n(f"{i}.ln1", b.ln1)
            n(f"{i}.ln2", b.ln2)
        if self.final_ln is not None:
            n("final_ln", self.final_ln)
        for lin in self.linears():
            t(lin.name + ".weight", lin.weight)
            t(lin.name + ".bias", lin.bias)
            h.update(repr((lin.weight_scale, lin.input_scale) if fp8 else None).encode())
        return h.hexdigest()


def _activation_name(fn: Any) -> str:
    name = activation_name(fn)
    if name is None:
        raise FP8ClipError(f"This encoder uses an activation the TensorRT export does not know ({fn!r}); "
                           f"supported: {', '.join(GELUS)}. Use it without the TensorRT node.")
    return name


def _norm(m: torch.nn.Module) -> NormSpec:
    return NormSpec(m.weight.detach().float().cpu(), m.bias.detach().float().cpu(), float(m.eps))


def spec_from_module(module: torch.nn.Module, record: Any | None) -> TransformerSpec:
    """Read a quantized text or vision transformer into a `TransformerSpec`.

    `module` is ComfyUI's `CLIPTextModel` / `CLIPVision` with ModelOpt quantizers and folded Q->DQ weights (the
    fake-quant runtime; scales from `record`) or the pack's `FP8TextModel` / `FP8VisionModel` (FP8 codes and
    scales stored in their `FP8Linear` layers): each keeps ComfyUI's layer names. `record` is the
    `QuantizedTower`; None exports every layer in high precision (the FP16 baseline engine).
    """
    tm = getattr(module, "text_model", None)
    if tm is not None and hasattr(tm, "encoder") and hasattr(tm, "final_layer_norm"):
        return _spec(module, record, tm.encoder.layers, "text_model.encoder.layers.",
                     tm.embeddings.position_embedding.weight, _norm(tm.final_layer_norm), None)
    emb = getattr(module, "embeddings", None)
    if (getattr(emb, "patch_embedding", None) is not None and getattr(emb, "class_embedding", None) is not None
            and isinstance(getattr(module, "pre_layrnorm", None), torch.nn.Module) and hasattr(module, "encoder")):
        conv = emb.patch_embedding
        if tuple(conv.stride) != tuple(conv.kernel_size) or any(int(p) for p in _pair(conv.padding)):
            raise FP8ClipError("This vision model's patch embedding is not a plain non-overlapping patch "
                               "convolution: the TensorRT export supports CLIP ViTs only.")
        stem = VisionStem(conv.weight.detach().float().cpu(),
                          None if conv.bias is None else conv.bias.detach().float().cpu(),
                          emb.class_embedding.detach().float().cpu(), _norm(module.pre_layrnorm))
        return _spec(module, record, module.encoder.layers, "encoder.layers.", emb.position_embedding.weight,
                     None, stem)
    raise FP8ClipError(f"Expected a ComfyUI CLIPTextModel or CLIP vision transformer, got "
                       f"{type(module).__name__}: only CLIP text and vision encoders can be exported to TensorRT "
                       "by this pack.")


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _spec(module: torch.nn.Module, record: Any | None, layers: Any, prefix: str, position: torch.Tensor,
          final_ln: NormSpec | None, stem: VisionStem | None) -> TransformerSpec:
    scales = dict(record.scales) if record is not None else {}

    def lin(name: str) -> LinearSpec:
        m = module.get_submodule(name)
        w = m.weight.detach().cpu()
        bias = None if m.bias is None else m.bias.detach().float().cpu()
        if w.dtype == torch.float8_e4m3fn:  # FP8Linear: its codes and scales are what it computes with
            ws = float(m.weight_scale)
            if record is None:
                return LinearSpec(name, w, bias, dequantize=ws)
            isc = getattr(m, "input_scale", None)
            return LinearSpec(name, w, bias, ws, None if isc is None else float(isc), dequantize=ws)
        s = scales.get(name)
        return LinearSpec(name, w, bias, None if s is None else float(s.weight_scale),
                          None if s is None or s.input_scale is None else float(s.input_scale))

    blocks = []
    for i, layer in enumerate(layers):
        p = f"{prefix}{i}."
        blocks.append(BlockSpec(_norm(layer.layer_norm1), lin(p + "self_attn.q_proj"), lin(p + "self_attn.k_proj"),
                                lin(p + "self_attn.v_proj"), lin(p + "self_attn.out_proj"), _norm(layer.layer_norm2),
                                lin(p + "mlp.fc1"), lin(p + "mlp.fc2")))
    first = layers[0]
    width = int(first.self_attn.q_proj.weight.shape[1])
    meta = {}
    if record is not None:
        meta = {"family": record.family, "tower": record.tower, "calibration": record.fingerprint,
                "recipe": record.recipe.to_json(), "kept": list(record.kept)}
    return TransformerSpec(width=width, heads=int(first.self_attn.heads),
                           activation=_activation_name(first.mlp.activation),
                           position=position.detach().float().cpu(), blocks=blocks, final_ln=final_ln, meta=meta,
                           stem=stem)


def to_fp8(w: torch.Tensor, scale: float) -> torch.Tensor:
    """The FP8 codes of a per-tensor-scaled weight (scale = amax/448, saturating as QuantizeLinear does)."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class _Graph:
    """A tiny builder over onnx.helper: unique names, initializers from torch tensors."""

    def __init__(self, dtype: torch.dtype):
        from onnx import TensorProto

        self.dtype = dtype
        self.onnx_dtype = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT}[dtype]
        self.np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        from onnx import numpy_helper

        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.inits.append(numpy_helper.from_array(arr.astype(dtype or self.np_dtype), name))
        return name

    def fp8_const(self, name: str, codes: torch.Tensor) -> str:
        from onnx import TensorProto, helper

        raw = codes.contiguous().view(torch.uint8).numpy().tobytes()
        self.inits.append(helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(codes.shape), raw, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _linear(g: _Graph, x: str, lin: LinearSpec, fp8: bool, zp: str) -> str:
    base = lin.name.replace(".", "/")
    if fp8 and lin.fp8:
        if lin.input_scale is not None:
            s_in = g.const(base + "/input_scale", lin.input_scale)
            x = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s_in, zp]), s_in, zp])
        # Stored transposed ([in, out]) so the graph is DQ -> MatMul, the pattern TensorRT fuses into an FP8 GEMM.
        codes = lin.codes if lin.codes is not None else to_fp8(lin.weight, lin.weight_scale)
        w = g.fp8_const(base + "/weight_fp8", codes.t().contiguous())
        w = g.op("DequantizeLinear", [w, g.const(base + "/weight_scale", lin.weight_scale), zp])
    else:
        w = g.const(base + "/weight", lin.weight.t().contiguous())
    y = g.op("MatMul", [x, w])
    if lin.bias is not None:
        y = g.op("Add", [y, g.const(base + "/bias", lin.bias)])
    return y


def _layer_norm(g: _Graph, x: str, ln: NormSpec, name: str) -> str:
    return g.op("LayerNormalization", [x, g.const(name + "/gamma", ln.weight), g.const(name + "/beta", ln.bias)],
                axis=-1, epsilon=ln.eps)


def _activation(g: _Graph, x: str, kind: str) -> str:
    if kind == "quick_gelu":
        return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, g.const(g.name("qg"), 1.702)])])])
    if kind == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
        e = g.op("Erf", [g.op("Mul", [x, g.const(g.name("rs2"), 1 / math.sqrt(2))])])
        half = g.op("Mul", [x, g.const(g.name("half"), 0.5)])
        return g.op("Mul", [half, g.op("Add", [e, g.const(g.name("one"), 1.0)])])
    # gelu tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [x3, g.const(g.name("c"), 0.044715)])]),
                         g.const(g.name("k"), math.sqrt(2 / math.pi))])
    return g.op("Mul", [g.op("Mul", [x, g.const(g.name("half"), 0.5)]),
                        g.op("Add", [g.op("Tanh", [inner]), g.const(g.name("one"), 1.0)])])


def _attention(g: _Graph, x: str, b: BlockSpec, spec: TransformerSpec, fp8: bool, zp: str, mask: str | None
               ) -> str:
    seq, heads, d = spec.seq, spec.heads, spec.width // spec.heads
    split = g.const(g.name("split_shape"), [0, seq, heads, d], np.int64)  # 0 keeps the (dynamic) batch

    def heads_first(t: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm)

    q = heads_first(_linear(g, x, b.q, fp8, zp), [0, 2, 1, 3])  # [B, H, S, d]
    k = heads_first(_linear(g, x, b.k, fp8, zp), [0, 2, 3, 1])  # [B, H, d, S]
    v = heads_first(_linear(g, x, b.v, fp8, zp), [0, 2, 1, 3])
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(g.name("scale"), 1 / math.sqrt(d))])
    if mask is not None:
        scores = g.op("Add", [scores, mask])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                              g.const(g.name("merge_shape"), [0, seq, spec.width], np.int64)])
    return _linear(g, merged, b.o, fp8, zp)


def _vision_stem(g: _Graph, spec: TransformerSpec) -> str:
    """pixels -> patch conv (high precision, as the runtimes keep it) -> [class; patches] + positions -> LN."""
    stem = spec.stem
    x = g.op("Cast", [PIXELS], to=g.onnx_dtype)
    conv_in = [x, g.const("patch_embedding/weight", stem.patch_weight)]
    if stem.patch_bias is not None:
        conv_in.append(g.const("patch_embedding/bias", stem.patch_bias))
    x = g.op("Conv", conv_in, kernel_shape=[stem.patch, stem.patch], strides=[stem.patch, stem.patch])
    x = g.op("Transpose", [g.op("Reshape", [x, g.const("patches_shape", [0, spec.width, -1], np.int64)])],
             perm=[0, 2, 1])  # [B, patches, width]
    # The class token for every image of a dynamic batch: expand [1, 1, width] to [B, 1, width].
    rows = g.op("Shape", [x], start=0, end=1)
    shape = g.op("Concat", [rows, g.const("class_tail", [1, spec.width], np.int64)], axis=0)
    cls = g.op("Expand", [g.const("class_embedding", stem.class_embedding.view(1, 1, -1)), shape])
    x = g.op("Add", [g.op("Concat", [cls, x], axis=1), g.const("position_embedding", spec.position.unsqueeze(0))])
    return _layer_norm(g, x, stem.pre_ln, "pre_layrnorm")


def build_onnx(spec: TransformerSpec, *, compute_dtype: torch.dtype = torch.float32, fp8: bool = True):
    """The ONNX model (onnx.ModelProto) of `spec`: FP8 Q/DQ where the spec has scales (unless fp8=False).

    compute_dtype: the precision of everything that is not an FP8 matmul: float32 (the PyTorch FP8 path's) or
    float16.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _Graph(compute_dtype)
    zp = g.fp8_const("fp8_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))
    seq = spec.seq
    if spec.stem is None:
        x = g.op("Cast", [INPUT], to=g.onnx_dtype)
        x = g.op("Add", [x, g.const("position_embedding", spec.position.unsqueeze(0))])
        # Causal mask: a large negative (not -inf) keeps fp16 softmax finite, as ComfyUI's -finfo.max does in fp32.
        neg = -1e4 if compute_dtype == torch.float16 else -torch.finfo(torch.float32).max
        mask = g.const("causal_mask", torch.full((seq, seq), neg).triu(1))
    else:
        x, mask = _vision_stem(g, spec), None
    hidden = []
    for i, b in enumerate(spec.blocks):
        p = f"layers.{i}"
        x = g.op("Add", [x, _attention(g, _layer_norm(g, x, b.ln1, p + ".ln1"), b, spec, fp8, zp, mask)])
        h = _linear(g, _layer_norm(g, x, b.ln2, p + ".ln2"), b.fc1, fp8, zp)
        x = g.op("Add", [x, _linear(g, _activation(g, h, spec.activation), b.fc2, fp8, zp)])
        hidden.append(g.op("Unsqueeze", [x, g.const(g.name("axis1"), [1], np.int64)]))
    g.op("Cast", [g.op("Concat", hidden, axis=1)], HIDDEN_STATES, to=TensorProto.FLOAT)
    if spec.final_ln is not None:
        x = _layer_norm(g, x, spec.final_ln, "final_layer_norm")
    g.op("Cast", [x], LAST_HIDDEN, to=TensorProto.FLOAT)

    def vi(t: TensorIO):
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["batch" if d < 0 else d for d in t.shape])

    io = spec.io()
    graph = helper.make_graph(g.nodes, f"fp8clip_{spec.kind}_transformer", [vi(t) for t in io if t.mode == "input"],
                              [vi(t) for t in io if t.mode == "output"], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="comfyui-fp8-clip", producer_version=str(EXPORT_VERSION))
    model.ir_version = IR_VERSION
    meta = {"export_version": str(EXPORT_VERSION), "compute_dtype": str(compute_dtype), "fp8": str(fp8),
            **{k: str(v) for k, v in spec.meta.items()}}
    onnx.helper.set_model_props(model, meta)
    return model


def export_transformer(module: torch.nn.Module, record: Any | None = None, *,
                       compute_dtype: torch.dtype = torch.float32, fp8: bool = True):
    """Shortcut: `build_onnx(spec_from_module(module, record))` (text or vision)."""
    return build_onnx(spec_from_module(module, record), compute_dtype=compute_dtype, fp8=fp8)


export_text_transformer = export_transformer  # the name the text tests and benchmarks use


def fp8_weight_bytes(model) -> int:
    """Bytes of FP8 initializers in an exported model (how much of it is stored in FP8)."""
    from onnx import TensorProto

    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN)
