"""What ComfyUI patches in for a quantized tower: a proxy that forwards calls and holds no weights.

ComfyUI's loaders walk the patched model by name: v0.29's dynamic-VRAM patcher backs up every parameter
and buffer it finds and, after undoing the object patches, writes those backups back by name, i.e. into the
ORIGINAL tower (corrupting the input CLIP, or crashing on names the original lacks). So the quantized tower
lives outside the module tree ComfyUI sees, places itself on the device it runs on, and goes back to the
offload device when ComfyUI unloads the model.

Its state_dict is the original tower's: object patches must not change the keys ComfyUI sees, or a LoRA
loaded onto the quantized CLIP would find no keys and be dropped with a few warnings (instead of the clear
error `RefuseLaterWeightPatches` gives), and CLIPSave would write a CLIP without this tower.
"""
from __future__ import annotations

from typing import Any

import torch

# Roots of the weight names of CLIP towers: reaching for them means something wants to patch weights.
WEIGHT_ROOTS = frozenset({"text_model", "text_projection", "embeddings", "encoder", "pre_layrnorm",
                          "post_layernorm", "visual_projection"})


class WeightPatchAfterQuantization(AttributeError):
    pass


class TowerProxy(torch.nn.Module):
    def __init__(self, impl: torch.nn.Module, original: torch.nn.Module, load_device: Any, offload_device: Any):
        super().__init__()
        # object.__setattr__: not registered as submodules, so invisible to .to()/named_*().
        object.__setattr__(self, "impl", impl)
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "load_device", torch.device(load_device))
        object.__setattr__(self, "offload_device", torch.device(offload_device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.place(self.load_device)
        return self.impl(*args, **kwargs)

    def place(self, device: torch.device) -> None:
        p = next(self.impl.parameters(), None)
        if p is not None and p.device != device and not (device.type == "cuda" and p.device.type == "cuda"
                                                         and device.index is None):
            self.impl.to(device)

    def offload(self, *args: Any, **kwargs: Any) -> None:
        """ON_DETACH callback: ComfyUI unloaded this model, so free the tower's VRAM too."""
        if self.offload_device != self.load_device:
            self.place(self.offload_device)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return self.original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.impl.get_input_embeddings()

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.impl.set_input_embeddings(embeddings)

    def __getattr__(self, name: str) -> Any:
        if name in WEIGHT_ROOTS:
            raise WeightPatchAfterQuantization(
                f"The FP8 tower's weights cannot be patched after quantization (a LoRA or model merge applied "
                f"to the quantized CLIP, reaching for '{name}'). Apply LoRAs to the CLIP before the Quantize "
                "node: they are baked into the FP8 weights there.")
        try:
            return super().__getattr__(name)
        except AttributeError:
            impl = self.__dict__.get("impl")
            if impl is None:
                raise
            return getattr(impl, name)


class RefuseLaterWeightPatches:
    """ON_LOAD callback: a LoRA added after quantization targets weights that now live in FP8 outside the
    model ComfyUI patches, so ComfyUI would silently skip it. Fail with the fix instead."""

    def __init__(self, path: str):
        self.prefix = path + "."

    def __call__(self, patcher: Any, *args: Any, **kwargs: Any) -> None:
        late = [k for k in patcher.patches if k.startswith(self.prefix)]
        if late:
            raise WeightPatchAfterQuantization(
                f"{len(late)} weight patches (a LoRA or model merge) were applied to the quantized CLIP, e.g. "
                f"{late[0]}. They cannot be applied to FP8 weights after calibration. Apply LoRAs to the CLIP "
                "before the Quantize node: they are baked into the FP8 weights there.")


def unwrap(obj: Any) -> Any:
    return obj.impl if isinstance(obj, TowerProxy) else obj


def original_of(obj: Any) -> Any:
    """The unquantized module a proxy stands in for (the module itself when it is not a proxy)."""
    return obj.original if isinstance(obj, TowerProxy) else obj
