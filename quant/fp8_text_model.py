"""The CLIP text transformer with real FP8 weights, a drop-in for ComfyUI's `CLIPTextModel`.

Same call and outputs as comfy.clip_model.CLIPTextModel (embeds in; last hidden, clip-skip hidden,
projected pooled, pooled out), same submodule names (`text_model.encoder.layers.N.self_attn.q_proj`...),
so ComfyUI's encode path, CLIPSetLastLayer and textual inversion work unchanged.

Speed on FP8 GPUs comes from running the fixed part (embeds [B, 77, D] -> hidden states) as one CUDA graph
per shape, with the activation quantization fused into the LayerNorm/GELU/residual kernels around each FP8
matmul (fp8_fused; or by torch.compile, `fp8-compiled`). Pooling by prompt length stays outside the graph.
"""
from __future__ import annotations

from typing import Any

import torch

from .fp8_encoder import FP8Runner, build_layers, fp8_or_kept, layer_norm
from .fp8_ops import FP8Embedding
from .patching import row_scales_of


class FP8TextModel(FP8Runner):
    """Built by `from_quantized` from a calibrated (fake-quant) ComfyUI CLIPTextModel and its scales."""

    def __init__(self) -> None:
        super().__init__()
        self.text_model = torch.nn.Module()

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, src: torch.nn.Module, scales: dict[str, Any], fp8_embedding: bool = False,
                       dtype: torch.dtype = torch.float16) -> "FP8TextModel":
        """`src`: ComfyUI CLIPTextModel whose quantized Linears hold folded Q->DQ weights; `scales`: per layer;
        `dtype`: the checkpoint's (artifact.QuantizedTower.dtype), for the layers and the token table kept in
        high precision."""
        m = cls()
        tm = src.text_model
        m.num_layers = len(tm.encoder.layers)
        m.eos_token_id = tm.eos_token_id
        m.text_model.eos_token_id = tm.eos_token_id
        emb = torch.nn.Module()
        tok = tm.embeddings.token_embedding
        emb.token_embedding = (FP8Embedding(tok.weight, row_scales_of(tok)) if fp8_embedding
                               else _embedding_copy(tok, dtype))
        emb.position_embedding = torch.nn.Embedding(*tm.embeddings.position_embedding.weight.shape)
        with torch.no_grad():
            emb.position_embedding.weight.copy_(tm.embeddings.position_embedding.weight.float())
        emb.position_embedding.requires_grad_(False)
        m.text_model.embeddings = emb

        layers = build_layers(tm.encoder.layers, "text_model.encoder.layers.", scales, dtype)
        m.text_model.encoder = torch.nn.Module()
        m.text_model.encoder.layers = layers
        m.text_model.final_layer_norm = layer_norm(tm.final_layer_norm)
        m.text_projection = fp8_or_kept("text_projection", src.text_projection, scales, dtype)
        return m

    # --- ComfyUI's interface --------------------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.text_model.embeddings.token_embedding = embeddings

    def forward(self, input_tokens=None, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=torch.float32, embeds_info=(), **kwargs):
        if embeds is None:
            embeds = self.get_input_embeddings()(input_tokens, out_dtype=dtype)
        device = self._place(self.load_device or embeds.device)
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
            last, inter = self.run_core(x, mask, intermediate_output, bool(final_layer_norm_intermediate))
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
        x, inter = self.run_layers(x, self._causal(x, mask), inter_idx)
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
        if ln_inter:  # as ComfyUI's CLIPTextModel_ does for every intermediate output
            inter = tm.final_layer_norm(inter)
        return tm.final_layer_norm(x), inter

    def encoder_layers(self) -> torch.nn.ModuleList:
        return self.text_model.encoder.layers


class _TokenEmbedding(torch.nn.Embedding):
    """The original token embedding (fp16 table), callable with ComfyUI's `out_dtype=`."""

    def forward(self, input: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return super().forward(input.to(self.weight.device)).to(device=input.device, dtype=out_dtype or torch.float32)


def _embedding_copy(tok: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """In the checkpoint's dtype, not the calibration copy's fp32: twice the memory (CLIP-L 152 MB, CLIP-G
    253 MB) for the same values."""
    e = _TokenEmbedding(*tok.weight.shape, dtype=dtype)
    with torch.no_grad():
        e.weight.copy_(tok.weight)
    return e.requires_grad_(False)
