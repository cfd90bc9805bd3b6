"""A drop-in for ComfyUI's CLIPTextModel whose encoder runs on a TensorRT engine.

Same call as `comfy.clip_model.CLIPTextModel` and the same outputs `(last_hidden, intermediate, projected_pooled,
pooled)`. The token embedding stays a torch module (`get_input_embeddings()`, so textual inversion and
`embedding:` prompts work); the engine takes the embeddings and returns the last hidden state and every block's
output; clip skip, the final LayerNorm on an intermediate layer, the pooled gather and the text projection run
in torch on the quantized module's own layers.
"""
from __future__ import annotations

from typing import Any

import torch

from ..quant import artifact
from ..quant.errors import FP8ClipError
from .runners import Runner


class EngineProfileError(FP8ClipError):
    """The prompt needs more rows than the engine's optimization profile holds."""


class EngineTextModel(torch.nn.Module):
    def __init__(self, source: torch.nn.Module, runner: Runner, *, max_rows: int, status: str = ""):
        super().__init__()
        tm = source.text_model
        self.num_layers = source.num_layers
        self.dtype = getattr(source, "dtype", None)
        self.eos_token_id = getattr(tm, "eos_token_id", None)
        # Shared with the quantized module, not copied. Names differ from CLIPTextModel's on purpose: a LoRA
        # applied after this node must not patch half of an encoder whose other half is baked into the engine.
        self.embeddings = tm.embeddings
        self.final_layer_norm = tm.final_layer_norm
        self.text_projection = source.text_projection
        self.max_rows = int(max_rows)
        self.status = status
        self._on_cuda = False
        object.__setattr__(self, "runner", runner)  # not a submodule: its memory is not torch parameters
        record = artifact.record_of(source)
        if record is not None:
            artifact.attach(self, record)

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, runner={type(self.runner).__name__}"

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.embeddings.token_embedding = embeddings

    def _apply(self, fn, *args, **kwargs):
        # ComfyUI offloads a model with .to(offload_device): release the engine's GPU memory with it (it is
        # loaded again on the next encode). Only on a move off the GPU: a text encoder ComfyUI keeps on the
        # CPU is moved to the CPU on every load, and must not reload the engine each time.
        out = super()._apply(fn, *args, **kwargs)
        on_cuda = self.embeddings.token_embedding.weight.device.type == "cuda"
        if self._on_cuda and not on_cuda:
            self.runner.release()
        self._on_cuda = on_cuda
        return out

    def vram_bytes(self) -> int:
        """GPU memory when loaded: the engine (weights + activations) and the torch layers kept beside it."""
        torch_bytes = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return self.runner.device_bytes() + torch_bytes

    def forward(self, input_tokens=None, attention_mask=None, embeds=None, num_tokens=None,
                intermediate_output=None, final_layer_norm_intermediate=True, dtype=torch.float32,
                embeds_info=(), **kwargs: Any):
        if attention_mask is not None:
            raise FP8ClipError("This CLIP asks for attention masks, which the TensorRT engine was not built "
                               "with. Use the CLIP from the Quantize CLIP to FP8 node instead of the engine.")
        if embeds is None:
            embeds = self.get_input_embeddings()(input_tokens, out_dtype=torch.float32)
        rows = embeds.shape[0]
        if rows > self.max_rows:
            raise EngineProfileError(
                f"This prompt needs {rows} rows of 77 tokens (long prompts take one row per 77 tokens, weighted "
                f"prompts one more, batched prompts one each), but the TensorRT engine was built for at most "
                f"{self.max_rows}. Raise max_batch_rows on the 'Build TensorRT Engine for FP8 CLIP' node to at "
                f"least {rows} (the engine is rebuilt once), or shorten the prompt.")
        last, hidden = self.runner(embeds.float())
        last, hidden = last.to(embeds.device), hidden.to(embeds.device)

        inter = None
        if intermediate_output is not None:
            if intermediate_output == "all":
                inter = hidden
            elif isinstance(intermediate_output, int):
                idx = intermediate_output if intermediate_output >= 0 else self.num_layers + intermediate_output
                if not 0 <= idx < self.num_layers:
                    raise FP8ClipError(f"Clip skip selects layer {intermediate_output}, but this CLIP has "
                                       f"{self.num_layers} layers.")
                inter = hidden[:, idx]
            else:
                raise FP8ClipError(f"Intermediate output {intermediate_output!r} is not supported by the "
                                   "TensorRT engine (use a layer index, or 'all').")
            if final_layer_norm_intermediate:
                inter = self.final_layer_norm(inter)

        if num_tokens is not None:
            pooled = last[torch.arange(rows, device=last.device), torch.as_tensor(num_tokens, device=last.device) - 1]
        else:
            eos = (torch.round(input_tokens).to(torch.int, device=last.device) == self.eos_token_id).int().argmax(-1)
            pooled = last[torch.arange(rows, device=last.device), eos]
        return last, inter, self.text_projection(pooled), pooled
