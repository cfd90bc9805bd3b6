"""The CLIP vision transformer with real FP8 weights, a drop-in for ComfyUI's `CLIPVision` module.

Patched in as `vision_model` of ComfyUI's CLIPVisionModelProjection, so ClipVisionModel.encode_image, the
projection to image_embeds, CLIPVisionEncode, unCLIP and IP-Adapter-style nodes run unchanged. The patch
embedding (a convolution; NVIDIA's recipe keeps it in high precision) stays as it was.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .fp8_encoder import FP8Runner, build_layers, layer_norm


class KeptConv2d(torch.nn.Conv2d):
    """The patch embedding with its checkpoint weights, computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.conv2d(x, self.weight.to(x.device, x.dtype), b, self.stride, self.padding)


class FP8VisionModel(FP8Runner):
    @classmethod
    def from_quantized(cls, src: torch.nn.Module, scales: dict[str, Any], dtype: torch.dtype = torch.float16
                       ) -> "FP8VisionModel":
        """`src`: ComfyUI CLIPVision whose quantized Linears hold folded Q->DQ weights; `scales`: per layer;
        `dtype`: the checkpoint's (artifact.QuantizedTower.dtype), for the layers kept in high precision."""
        m = cls()
        e = src.embeddings
        conv = e.patch_embedding
        emb = torch.nn.Module()
        emb.patch_embedding = KeptConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                         bias=conv.bias is not None, dtype=dtype)
        with torch.no_grad():
            emb.patch_embedding.weight.copy_(conv.weight)
            if conv.bias is not None:
                emb.patch_embedding.bias.copy_(conv.bias)
        emb.class_embedding = None if e.class_embedding is None else torch.nn.Parameter(
            e.class_embedding.detach().float().clone(), requires_grad=False)
        emb.position_embedding = torch.nn.Embedding(*e.position_embedding.weight.shape)
        with torch.no_grad():
            emb.position_embedding.weight.copy_(e.position_embedding.weight.float())
        emb.requires_grad_(False)
        m.embeddings = emb
        m.pre_layrnorm = layer_norm(src.pre_layrnorm)
        m.encoder = torch.nn.Module()
        m.encoder.layers = build_layers(src.encoder.layers, "encoder.layers.", scales, dtype)
        m.post_layernorm = layer_norm(src.post_layernorm)
        m.num_layers = len(src.encoder.layers)
        return m

    def forward(self, pixel_values: torch.Tensor, attention_mask=None, intermediate_output=None):
        device = self._place(self.load_device or pixel_values.device)
        x = pixel_values.to(device, torch.float32)
        if isinstance(intermediate_output, int) and intermediate_output < 0:
            intermediate_output = self.num_layers + intermediate_output
        if intermediate_output is not None and not isinstance(intermediate_output, int):
            raise ValueError("FP8 CLIP vision serves the last or one intermediate layer, not all of them.")
        last, inter = self.run_core(x, None, intermediate_output, False)
        pooled = self.post_layernorm(last[:, 0, :])
        return last, inter, pooled

    def _core(self, pixel_values, mask, inter_idx, ln_inter):
        e = self.embeddings
        x = e.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if e.class_embedding is not None:
            x = torch.cat([e.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.pre_layrnorm(x + e.position_embedding.weight.to(x.dtype))
        return self.run_layers(x, None, inter_idx)

    def encoder_layers(self) -> torch.nn.ModuleList:
        return self.encoder.layers
