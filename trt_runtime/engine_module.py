"""Drop-ins for ComfyUI's CLIPTextModel and CLIPVision whose encoders run on a TensorRT engine.

Same call as `comfy.clip_model.CLIPTextModel` and the same outputs `(last_hidden, intermediate, projected_pooled,
pooled)`. The token embedding stays a torch module (`get_input_embeddings()`, so textual inversion and
`embedding:` prompts work); the engine takes the embeddings and returns the last hidden state and every block's
output; clip skip, the final LayerNorm on an intermediate layer, the pooled gather and the text projection run
in torch on the quantized module's own layers.

`EngineVisionModel` has CLIPVision's call and outputs `(last_hidden, intermediate, pooled)`: the engine takes the
pixel values (patch embedding to the last block inside) and returns the last hidden state and every block's
output; the intermediate layer ComfyUI asks for (-2, or 'all') and post_layernorm on the class token run in
torch; the visual projection stays in ComfyUI's CLIPVisionModelProjection around it.
"""
from __future__ import annotations

from typing import Any

import torch

from ..quant import artifact
from ..quant.errors import FP8ClipError
from .runners import Runner


class EngineProfileError(FP8ClipError):
    """The prompt needs more rows than the engine's optimization profile holds."""


class EngineTower(torch.nn.Module):
    """What both drop-ins share: the runner beside the torch layers, the record, GPU memory that follows
    ComfyUI's loads and offloads."""

    def __init__(self, source: torch.nn.Module, runner: Runner, *, max_rows: int, status: str = ""):
        super().__init__()
        self.max_rows = int(max_rows)
        self.status = status
        self._on_cuda = False
        object.__setattr__(self, "runner", runner)  # not a submodule: its memory is not torch parameters
        record = artifact.record_of(source)
        if record is not None:
            artifact.attach(self, record)

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, runner={type(self.runner).__name__}"

    def _probe(self) -> torch.Tensor:
        """A torch weight that moves whenever ComfyUI moves this module."""
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):
        # ComfyUI offloads a model with .to(offload_device): release the engine's GPU memory with it (it is
        # loaded again on the next encode). Only on a move off the GPU: a text encoder ComfyUI keeps on the
        # CPU is moved to the CPU on every load, and must not reload the engine each time.
        out = super()._apply(fn, *args, **kwargs)
        on_cuda = self._probe().device.type == "cuda"
        if self._on_cuda and not on_cuda:
            self.runner.release()
        self._on_cuda = on_cuda
        return out

    def free_device_memory(self) -> None:
        """The proxy's hook for an unload (its weight moves bypass .to(), so _apply does not see them)."""
        self.runner.release()
        self._on_cuda = False

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.runner(x)
        # A CLIP ComfyUI keeps on the CPU (--lowvram, --novram, a loader's cpu device) is never moved to the GPU
        # or back, so no offload releases the engine: it would hold its GPU memory for as long as the node's
        # output lives, on the machines shortest of it. It is loaded for each encode instead.
        if self.runner.device.type == "cuda" and self._probe().device.type != "cuda":
            self.runner.release()
        return out

    def vram_bytes(self) -> int:
        """GPU memory when loaded: the engine (weights + activations) and the torch layers kept beside it."""
        torch_bytes = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return self.runner.device_bytes() + torch_bytes

    def _select(self, hidden: torch.Tensor, intermediate_output: Any, num_layers: int) -> torch.Tensor | None:
        """The intermediate output ComfyUI asks for, from every block's output [rows, layers, seq, width]."""
        if intermediate_output is None:
            return None
        if intermediate_output == "all":
            return hidden
        if isinstance(intermediate_output, int):
            idx = intermediate_output if intermediate_output >= 0 else num_layers + intermediate_output
            if not 0 <= idx < num_layers:
                raise FP8ClipError(f"Layer {intermediate_output} was asked for (clip skip or intermediate output), "
                                   f"but this model has {num_layers} layers.")
            return hidden[:, idx]
        raise FP8ClipError(f"Intermediate output {intermediate_output!r} is not supported by the TensorRT "
                           "engine (use a layer index, or 'all').")


class EngineTextModel(EngineTower):
    def __init__(self, source: torch.nn.Module, runner: Runner, *, max_rows: int, status: str = ""):
        super().__init__(source, runner, max_rows=max_rows, status=status)
        tm = source.text_model
        self.num_layers = source.num_layers
        self.dtype = getattr(source, "dtype", None)
        self.eos_token_id = getattr(tm, "eos_token_id", None)
        # Shared with the quantized module, not copied. Names differ from CLIPTextModel's on purpose: a LoRA
        # applied after this node must not patch half of an encoder whose other half is baked into the engine.
        self.embeddings = tm.embeddings
        self.final_layer_norm = tm.final_layer_norm
        self.text_projection = source.text_projection

    def _probe(self) -> torch.Tensor:
        return self.embeddings.token_embedding.weight

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.embeddings.token_embedding = embeddings

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
                f"least {rows} (the engine is rebuilt once; the Quantize node's 'tensorrt' runtime always builds "
                "for 8: use the Build node for more), or shorten the prompt.")
        last, hidden = self._run(embeds.float())
        last, hidden = last.to(embeds.device), hidden.to(embeds.device)

        inter = self._select(hidden, intermediate_output, self.num_layers)
        if inter is not None and final_layer_norm_intermediate:
            inter = self.final_layer_norm(inter)

        if num_tokens is not None:
            pooled = last[torch.arange(rows, device=last.device), torch.as_tensor(num_tokens, device=last.device) - 1]
        else:
            ids = torch.round(input_tokens).to(device=last.device, dtype=torch.int)
            eos = (ids == self.eos_token_id).int().argmax(-1)
            pooled = last[torch.arange(rows, device=last.device), eos]
        return last, inter, self.text_projection(pooled), pooled


class EngineVisionModel(EngineTower):
    def __init__(self, source: torch.nn.Module, runner: Runner, *, max_rows: int, pixels: tuple[int, int, int],
                 status: str = ""):
        super().__init__(source, runner, max_rows=max_rows, status=status)
        self.num_layers = len(source.encoder.layers)
        self.pixels = tuple(pixels)
        # Shared with the quantized module. Not named post_layernorm: the tower's weight names must not look
        # patchable here (the rest of the encoder is baked into the engine).
        self.pooled_norm = source.post_layernorm

    def _probe(self) -> torch.Tensor:
        return self.pooled_norm.weight

    def forward(self, pixel_values: torch.Tensor, attention_mask=None, intermediate_output=None):
        rows = pixel_values.shape[0]
        if rows > self.max_rows:
            raise EngineProfileError(
                f"This batch has {rows} images, but the TensorRT engine was built for at most {self.max_rows}. "
                f"Raise max_images on the 'Build TensorRT Engine for FP8 CLIP Vision' node to at least {rows} "
                "(the engine is rebuilt once; the Quantize node's 'tensorrt' runtime always builds for 4: use the "
                "Build node for more), or encode fewer images at a time.")
        if tuple(pixel_values.shape[1:]) != self.pixels:
            raise FP8ClipError(f"The TensorRT engine takes images of {list(self.pixels)} (channels, height, width), "
                               f"got {list(pixel_values.shape[1:])}. Encode through CLIPVisionEncode, which resizes "
                               "to the model's size.")
        last, hidden = self._run(pixel_values.float())
        last, hidden = last.to(pixel_values.device), hidden.to(pixel_values.device)
        inter = self._select(hidden, intermediate_output, self.num_layers)
        return last, inter, self.pooled_norm(last[:, 0, :])
