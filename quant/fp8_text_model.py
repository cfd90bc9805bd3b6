"""The CLIP text transformer with real FP8 weights, a drop-in for ComfyUI's `CLIPTextModel`.

Same call and outputs as comfy.clip_model.CLIPTextModel (embeds in; last hidden, clip-skip hidden,
projected pooled, pooled out), same submodule names (`text_model.encoder.layers.N.self_attn.q_proj`...),
so ComfyUI's encode path, CLIPSetLastLayer and textual inversion work unchanged.

Speed on FP8 GPUs comes from running the fixed part (embeds [B, 77, D] -> hidden states) as one CUDA graph
per shape, optionally compiled first so the activation quantization is fused into the LayerNorm/GELU
kernels before each FP8 matmul. Pooling by prompt length stays outside the graph.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .fp8_ops import FP8Embedding, FP8Linear

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _layer_norm(ln: torch.nn.Module) -> torch.nn.LayerNorm:
    out = torch.nn.LayerNorm(ln.weight.shape[0], eps=getattr(ln, "eps", 1e-5))
    with torch.no_grad():
        out.weight.copy_(ln.weight.float())
        out.bias.copy_(ln.bias.float())
    return out.requires_grad_(False)


class KeptLinear(torch.nn.Linear):
    """A layer kept in high precision: the checkpoint's fp16 weights, computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.weight.to(x.device, x.dtype), b)


def _kept_linear(lin: torch.nn.Module) -> KeptLinear:
    out = KeptLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=torch.float16)
    with torch.no_grad():
        out.weight.copy_(lin.weight)
        if lin.bias is not None:
            out.bias.data = lin.bias.detach().float().clone()
    return out.requires_grad_(False)


def sdpa_attention(q, k, v, heads, mask=None, **kwargs):
    b, t, d = q.shape
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    return a.transpose(1, 2).reshape(b, t, d)


def host_attention(device: torch.device) -> Callable:
    """ComfyUI's own attention for this device when running inside ComfyUI: the FP8 path then differs from
    the calibrated Q->DQ path only by FP8 arithmetic, not by another softmax implementation."""
    try:
        from comfy.ldm.modules.attention import optimized_attention_for_device
        return optimized_attention_for_device(device, mask=True, small_input=True)
    except Exception:
        return sdpa_attention


class _Attention(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads
        self.attention: Callable = sdpa_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(self.attention(q, k, v, self.heads, mask.to(q.dtype)))


class _MLP(torch.nn.Module):
    def __init__(self, activation: Callable):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Layer(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x).to(self.act_dtype), mask).to(x.dtype)
        return x + self.mlp(self.layer_norm2(x).to(self.act_dtype)).to(x.dtype)


class FP8TextModel(torch.nn.Module):
    """Built by `from_quantized` from a calibrated (fake-quant) ComfyUI CLIPTextModel and its scales."""

    def __init__(self) -> None:
        super().__init__()
        self.text_model = torch.nn.Module()
        self.act_dtype = torch.float32
        self.executor = "eager"  # "eager" | "cuda_graph" | "compiled"
        self.planner: Callable | None = None
        self.load_device: torch.device | None = None  # where ComfyUI runs this CLIP
        self._device: torch.device | None = None
        self._placement: tuple = ()
        self._graphs: OrderedDict = OrderedDict()
        self._compiled: Callable | None = None

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, src: torch.nn.Module, scales: dict[str, Any], fp8_embedding: bool = False
                       ) -> "FP8TextModel":
        """`src`: ComfyUI CLIPTextModel whose quantized Linears hold folded Q->DQ weights; `scales`: per layer."""
        m = cls()
        tm = src.text_model
        m.num_layers = len(tm.encoder.layers)
        m.eos_token_id = tm.eos_token_id
        m.text_model.eos_token_id = tm.eos_token_id
        emb = torch.nn.Module()
        tok = tm.embeddings.token_embedding
        emb.token_embedding = FP8Embedding(tok.weight) if fp8_embedding else _embedding_copy(tok)
        emb.position_embedding = torch.nn.Embedding(*tm.embeddings.position_embedding.weight.shape)
        with torch.no_grad():
            emb.position_embedding.weight.copy_(tm.embeddings.position_embedding.weight.float())
        emb.position_embedding.requires_grad_(False)
        m.text_model.embeddings = emb

        def linear(name: str, lin: torch.nn.Module) -> torch.nn.Module:
            s = scales.get(name)
            if s is None:
                return _kept_linear(lin)
            return FP8Linear.from_linear(lin, s.weight_scale, s.input_scale)

        layers = torch.nn.ModuleList()
        for i, l in enumerate(tm.encoder.layers):
            p = f"text_model.encoder.layers.{i}."
            nl = _Layer()
            nl.layer_norm1, nl.layer_norm2 = _layer_norm(l.layer_norm1), _layer_norm(l.layer_norm2)
            nl.self_attn = _Attention(l.self_attn.heads)
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(nl.self_attn, n, linear(p + "self_attn." + n, getattr(l.self_attn, n)))
            nl.mlp = _MLP(l.mlp.activation)
            nl.mlp.fc1, nl.mlp.fc2 = linear(p + "mlp.fc1", l.mlp.fc1), linear(p + "mlp.fc2", l.mlp.fc2)
            nl.act_dtype = torch.float32
            layers.append(nl)
        m.text_model.encoder = torch.nn.Module()
        m.text_model.encoder.layers = layers
        m.text_model.final_layer_norm = _layer_norm(tm.final_layer_norm)
        m.text_projection = linear("text_projection", src.text_projection)
        return m

    # --- ComfyUI's interface --------------------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.text_model.embeddings.token_embedding = embeddings

    def configure(self, planner: Callable[[torch.device], Any]) -> None:
        """`planner(device)` -> an object with .matmul ('scaled_mm'|'dequant'), .executor ('eager'|
        'cuda_graph'|'compiled') and .act_dtype; asked again whenever the model runs on another device."""
        self.planner = planner
        self._device = None

    def _place(self, device: torch.device) -> torch.device:
        """Keep every weight on the device this CLIP runs on.

        ComfyUI's loader moves modules it recognises one by one and may leave others (its lowvram and
        dynamic-VRAM modes differ between versions), so the module places itself, and drops captured CUDA
        graphs whenever a weight has moved (a graph holds raw pointers)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        params = self.__dict__.get("_param_list")
        if params is None:
            params = self.__dict__["_param_list"] = list(self.parameters())
        if any(p.device != device for p in params):
            self.to(device)
        placement = tuple(p.data_ptr() for p in params)
        if placement != self._placement:
            self._drop_graphs()
            self._placement = placement
        return device

    def _prepare(self, device: torch.device) -> None:
        if device == self._device:
            return
        p = self.planner(device) if self.planner else None
        matmul = getattr(p, "matmul", "dequant")
        self.executor = getattr(p, "executor", "eager")
        self.act_dtype = getattr(torch, getattr(p, "act_dtype", "float32"))
        for mod in self.modules():
            if isinstance(mod, FP8Linear):
                mod.mode = matmul
            if isinstance(mod, _Layer):
                mod.act_dtype = self.act_dtype
            if isinstance(mod, _Attention):
                mod.attention = host_attention(device)
        self._drop_graphs()
        self._compiled = None
        self._device = device

    def forward(self, input_tokens=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=torch.float32, embeds_info=(), **kwargs):
        if embeds is None:
            embeds = self.get_input_embeddings()(input_tokens, out_dtype=dtype)
        device = self._place(self.load_device or embeds.device)
        self._prepare(device)
        x = embeds.to(device, torch.float32)
        mask = None  # None: causal only, built inside the fixed part
        if attention_mask is not None:  # as comfy.clip_model builds it
            am = attention_mask.to(device, torch.float32)
            mask = 1.0 - am.reshape(am.shape[0], 1, -1, am.shape[-1]).expand(am.shape[0], 1, am.shape[-1], am.shape[-1])
            mask = mask.masked_fill(mask.to(torch.bool), -torch.finfo(torch.float32).max)
            mask = mask + torch.full((x.shape[1], x.shape[1]), -torch.finfo(torch.float32).max, device=device).triu_(1)
        if isinstance(intermediate_output, int) and intermediate_output < 0:
            intermediate_output = self.num_layers + intermediate_output
        if intermediate_output is None or isinstance(intermediate_output, int):
            last, inter = self._run_core(x, mask, intermediate_output, bool(final_layer_norm_intermediate))
        else:  # "all" or a list: rare, eager
            last, inter = self._core_all(x, mask, intermediate_output, final_layer_norm_intermediate)
        if num_tokens is not None:  # python ints: index without a host-to-device copy
            pooled = torch.stack([last[i, n - 1] for i, n in enumerate(num_tokens)])
        else:
            ids = torch.round(input_tokens).to(device=device, dtype=torch.int)
            idx = (ids == self.eos_token_id).int().argmax(dim=-1)
            pooled = last[torch.arange(last.shape[0], device=device), idx]
        projected = self.text_projection(pooled.to(self.act_dtype))
        return (last.float(), None if inter is None else inter.float(), projected.float(), pooled.float())

    # --- the fixed part -----------------------------------------------------------------------------------------
    @staticmethod
    def _causal(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return mask
        return torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)

    def _core(self, x: torch.Tensor, mask: torch.Tensor | None, inter_idx: int | None, ln_inter: bool):
        tm = self.text_model
        x = x + tm.embeddings.position_embedding.weight[: x.shape[1]].to(x.dtype)
        mask = self._causal(x, mask)
        inter = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, mask)
            if i == inter_idx:
                inter = x.clone()
        x = tm.final_layer_norm(x)
        if inter is not None and ln_inter:
            inter = tm.final_layer_norm(inter)
        return x, inter

    def _core_all(self, x, mask, which, ln_inter):
        tm = self.text_model
        x = x + tm.embeddings.position_embedding.weight[: x.shape[1]].to(x.dtype)
        mask = self._causal(x, mask)
        hs = []
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            hs.append(x.unsqueeze(1).clone())
        inter = torch.cat(hs, dim=1)
        if which != "all":
            inter = inter[:, list(which)]
        return tm.final_layer_norm(x), inter

    def _run_core(self, x, mask, inter_idx, ln_inter):
        if self.executor == "eager" or x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self._core(x, mask, inter_idx, ln_inter)
        fn = self._core
        if self.executor == "compiled":
            if self._compiled is None:
                self._compiled = torch.compile(self._core, dynamic=False, fullgraph=True)
            fn = self._compiled
        key = (tuple(x.shape), None if mask is None else tuple(mask.shape), inter_idx, ln_inter, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(fn, x, mask, inter_idx, ln_inter)
            self._graphs[key] = entry
            while len(self._graphs) > 24:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, sx, smask, out = entry
        sx.copy_(x)
        if smask is not None:
            smask.copy_(mask)
        graph.replay()
        return out[0].clone(), None if out[1] is None else out[1].clone()

    def _capture(self, fn, x, mask, inter_idx, ln_inter):
        sx = x.clone()
        smask = None if mask is None else mask.clone()
        s = torch.cuda.Stream(device=x.device)
        s.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compilation, cuBLAS workspaces, autotuning
                fn(sx, smask, inter_idx, ln_inter)
        torch.cuda.current_stream(x.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        if not hasattr(self, "_pool"):
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn(sx, smask, inter_idx, ln_inter)
        return graph, sx, smask, out

    def _drop_graphs(self) -> None:
        # A fresh memory pool too: the old one belongs to the graphs being released.
        self._graphs.clear()
        self.__dict__.pop("_pool", None)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class _TokenEmbedding(torch.nn.Embedding):
    """The original token embedding (fp16 table), callable with ComfyUI's `out_dtype=`."""

    def forward(self, input: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return super().forward(input.to(self.weight.device)).to(device=input.device, dtype=out_dtype or torch.float32)


def _embedding_copy(tok: torch.nn.Module) -> torch.nn.Module:
    e = _TokenEmbedding(*tok.weight.shape, dtype=tok.weight.dtype)
    with torch.no_grad():
        e.weight.copy_(tok.weight)
    return e.requires_grad_(False)
