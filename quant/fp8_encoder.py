"""Building blocks shared by the FP8 text and vision transformers, and the runner that executes them.

`FP8Runner` owns what is device-dependent: where the weights live (it moves them itself: ComfyUI's loader
handles only the module types it knows), which kernels run (a planner picks, per device, FP8 matmuls with
the fused Triton kernels of fp8_fused between them, or dequantization), and CUDA graphs of the fixed-shape
part, recaptured whenever a weight moves.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import fp8_fused
from .activations import activation_name
from .fp8_ops import FP8Linear

log = logging.getLogger(__name__)


def layer_norm(ln: torch.nn.Module) -> torch.nn.LayerNorm:
    out = torch.nn.LayerNorm(ln.weight.shape[0], eps=getattr(ln, "eps", 1e-5))
    with torch.no_grad():
        out.weight.copy_(ln.weight.float())
        out.bias.copy_(ln.bias.float())
    return out.requires_grad_(False)


class KeptLinear(torch.nn.Linear):
    """A layer kept in high precision: the checkpoint's weights, computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.weight.to(x.device, x.dtype), b)


def kept_linear(lin: torch.nn.Module, dtype: torch.dtype = torch.float16) -> KeptLinear:
    """`dtype`: the checkpoint's, as ComfyUI loaded it (the calibrated copy holds its values in fp32)."""
    out = KeptLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=dtype)
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
        self.shared_input = False  # q, k, v read one set of FP8 codes (see share_input)

    def share_input(self) -> None:
        """q, k and v see the same input, so calibration gives them the same input scale: quantize it once
        (the same codes each would compute; two fewer passes over the activations per layer)."""
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        self.shared_input = all(isinstance(p, FP8Linear) and p.mode == "scaled_mm" and p.input_scale is not None
                                for p in qkv) and len({float(p.input_scale_inv) for p in qkv}) == 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.shared_input:
            xq = self.q_proj.quantize(x)
            q, k, v = (p.matmul_quantized(xq, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(self.attention(q, k, v, self.heads, None if mask is None else mask.to(q.dtype)))


class _MLP(torch.nn.Module):
    def __init__(self, activation: Callable):
        super().__init__()
        self.activation = activation
        self.activation_name = activation_name(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Layer(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x).to(self.act_dtype), mask).to(x.dtype)
        return x + self.mlp(self.layer_norm2(x).to(self.act_dtype)).to(x.dtype)


def build_layers(src_layers: Any, prefix: str, scales: dict[str, Any], dtype: torch.dtype = torch.float16
                 ) -> torch.nn.ModuleList:
    """FP8 copies of ComfyUI CLIPLayers: quantized Linears -> FP8Linear, the rest kept as they were (in `dtype`)."""
    layers = torch.nn.ModuleList()
    for i, l in enumerate(src_layers):
        p = f"{prefix}{i}."
        nl = _Layer()
        nl.layer_norm1, nl.layer_norm2 = layer_norm(l.layer_norm1), layer_norm(l.layer_norm2)
        nl.self_attn = _Attention(l.self_attn.heads)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(nl.self_attn, n, fp8_or_kept(p + "self_attn." + n, getattr(l.self_attn, n), scales, dtype))
        nl.mlp = _MLP(l.mlp.activation)
        nl.mlp.fc1 = fp8_or_kept(p + "mlp.fc1", l.mlp.fc1, scales, dtype)
        nl.mlp.fc2 = fp8_or_kept(p + "mlp.fc2", l.mlp.fc2, scales, dtype)
        nl.act_dtype = torch.float32
        layers.append(nl)
    return layers


def fp8_or_kept(name: str, lin: torch.nn.Module, scales: dict[str, Any], dtype: torch.dtype = torch.float16
                ) -> torch.nn.Module:
    s = scales.get(name)
    if s is None:
        return kept_linear(lin, dtype)
    return FP8Linear.from_linear(lin, s.weight_scale, s.input_scale, s.input_scale_inv)


def _copy_into(dst: tuple, src: tuple) -> None:
    """Copy a captured run's outputs into the preallocated ones. A function of its own so that no reference
    to them outlives the capture: with cudaMallocAsync (ComfyUI's default), freeing memory allocated in a
    capture after it ended aborted the process (the intermediate layer's output, left in a loop variable:
    every CLIP vision encode, and text encodes with clip skip, on an H200)."""
    for d, t in zip(dst, src):
        if d is not None:
            d.copy_(t)


class _CaptureFailed(Exception):
    """The CUDA-graph capture failed (its cause is `__cause__`), not the code being captured."""


class FP8Runner(torch.nn.Module):
    """Base of the FP8 models: device placement, kernel plan, CUDA-graph execution of `_core`."""

    def __init__(self) -> None:
        super().__init__()
        self.act_dtype = torch.float32
        self.executor = "eager"  # "eager" | "cuda_graph" | "compiled"
        self.fused = False  # Triton kernels between the FP8 matmuls (fp8_fused)
        self.graphs = True  # "cuda_graph" / "compiled": replay CUDA graphs of `_core`
        self.planner: Callable | None = None
        self.load_device: torch.device | None = None  # where ComfyUI runs this model
        self._device: torch.device | None = None
        self._placement: tuple = ()
        self._graphs: OrderedDict = OrderedDict()
        self._compiled: Callable | None = None

    def configure(self, planner: Callable[[torch.device], Any]) -> None:
        """`planner(device)` -> an object with .matmul ('scaled_mm'|'dequant'), .executor ('eager'|
        'cuda_graph'|'compiled'), .kernels ('fused'|'torch'), .act_dtype and .graphs; asked again whenever the
        model runs on another device."""
        self.planner = planner
        self._device = None

    def _place(self, device: torch.device) -> torch.device:
        """Keep every weight on the device this model runs on, and drop captured CUDA graphs whenever a weight
        has moved (a graph holds raw pointers). ComfyUI never sees these modules (the tower's proxy moves them,
        quant/proxy.py); this is what makes any move, the proxy's or another's, safe for the graphs."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        params = self.__dict__.get("_param_list")
        if params is None:
            params = self.__dict__["_param_list"] = list(self.parameters())
        placement = tuple(map(torch.Tensor.data_ptr, params))  # C-speed: this runs on every encode
        if placement == self._placement and device == self._device:
            return device  # nothing moved since the last run here
        if any(p.device != device for p in params):
            self.to(device)
            placement = tuple(map(torch.Tensor.data_ptr, params))
        if placement != self._placement:
            self._drop_graphs()
            self._placement = placement
        self._prepare(device)
        return device

    def _prepare(self, device: torch.device) -> None:
        if device == self._device:
            return
        p = self.planner(device) if self.planner else None
        matmul = getattr(p, "matmul", "dequant")
        self.executor = getattr(p, "executor", "eager")
        self.graphs = getattr(p, "graphs", True)
        self.act_dtype = getattr(torch, getattr(p, "act_dtype", "float32"))
        for mod in self.modules():
            if isinstance(mod, FP8Linear):
                mod.mode = matmul
            if isinstance(mod, _Layer):
                mod.act_dtype = self.act_dtype
        for mod in self.modules():  # after the modes: sharing depends on them
            if isinstance(mod, _Attention):
                mod.attention = host_attention(device)
                mod.share_input()
        self.fused = getattr(p, "kernels", "torch") == "fused" and matmul == "scaled_mm"
        if self.fused:
            self.fused, why = fp8_fused.fusable(self.encoder_layers())
            if not self.fused:  # a loaded file's plan does not show this: the speed cost gets a reason in the log
                log.warning("FP8 CLIP: running the unfused FP8 path on %s (%s)", device, why)
        self._drop_graphs()
        self._compiled = None
        self._device = device

    def encoder_layers(self) -> torch.nn.ModuleList:
        raise NotImplementedError

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None, inter_idx: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder layers on fp32 hidden states: (after the last layer, after layer `inter_idx`)."""
        layers = self.encoder_layers()
        if self.fused:
            try:
                # Triton launches on the current device: a tower on another GPU than the current one (multi-GPU
                # node packs) would get its kernels on the wrong one when no graph capture sets it.
                with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
                    return fp8_fused.run_layers(x, layers, mask, inter_idx, self.act_dtype,
                                                self.__dict__.get("_kernel_buffers", fp8_fused.FRESH))
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a Triton that cannot build its kernels here: stay usable
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                log.warning("FP8 CLIP: the fused kernels failed (%s: %s); running the unfused FP8 path instead",
                            type(e).__name__, e)
                self.fused = False
        inter = None
        for i, layer in enumerate(layers):
            x = layer(x, mask)
            if i == inter_idx:
                inter = x.clone()
        return x, inter

    def _core(self, x: torch.Tensor, mask: torch.Tensor | None, inter_idx: int | None, ln_inter: bool):
        raise NotImplementedError

    def run_core(self, x: torch.Tensor, mask: torch.Tensor | None, inter_idx: int | None, ln_inter: bool):
        """`_core` through the planned executor: one CUDA graph per input shape on GPUs."""
        if self.executor == "eager" or x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self._core(x, mask, inter_idx, ln_inter)
        fn = self._core
        if self.executor == "compiled":
            if self._compiled is None:
                self._compiled = torch.compile(self._core, fullgraph=True)
            fn = self._compiled
        if not self.graphs:
            return fn(x, mask, inter_idx, ln_inter)
        key = (tuple(x.shape), None if mask is None else tuple(mask.shape), inter_idx, ln_inter, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(fn, x, mask, inter_idx, ln_inter)
            except _CaptureFailed as e:  # else every encode would capture, and fail, again
                log.warning("FP8 CLIP: capturing the CUDA graph failed (%s: %s); running without CUDA graphs on %s "
                            "from now on", type(e.__cause__).__name__, e.__cause__, x.device)
                self.graphs = False
                self._drop_graphs()
                return fn(x, mask, inter_idx, ln_inter)
            self._graphs[key] = entry
            while len(self._graphs) > 24:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, sx, smask, out = entry
        sx.copy_(x)
        if smask is not None:
            smask.copy_(mask)
        graph.replay()  # on the current stream of the graph's device: after the copies
        return out[0].clone(), None if out[1] is None else out[1].clone()

    def _capture(self, fn, x, mask, inter_idx, ln_inter):
        # The fused kernels' tensors come from buffers made in the warm-up, outside the capture (see
        # fp8_fused.Workspace); shared by this model's graphs.
        ws = self.__dict__.setdefault("_workspace", fp8_fused.Workspace())
        ws.grown = False
        self.__dict__["_kernel_buffers"] = ws
        try:
            return self._capture_with(fn, x, mask, inter_idx, ln_inter, ws)
        finally:
            ws.sealed = False
            self.__dict__.pop("_kernel_buffers", None)
            if ws.grown:  # also when the warm-up failed (out of memory) after replacing a buffer
                self._graphs.clear()

    def _capture_with(self, fn, x, mask, inter_idx, ln_inter, ws):
        sx = x.clone()
        smask = None if mask is None else mask.clone()
        s = torch.cuda.Stream(device=x.device)
        s.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compilation, cuBLAS workspaces, autotuning
                warm = fn(sx, smask, inter_idx, ln_inter)
        torch.cuda.current_stream(x.device).wait_stream(s)
        if ws.grown:  # graphs captured before read buffers that were just replaced
            self._graphs.clear()
        ws.sealed = True
        # Outputs allocated outside the capture: with cudaMallocAsync (ComfyUI's default) memory allocated in
        # a capture belongs to the graph, and freeing it with the graph warned on every drop.
        out = tuple(None if t is None else torch.empty_like(t) for t in warm)
        del warm
        graph = torch.cuda.CUDAGraph()
        if "_pool" not in self.__dict__:
            self.__dict__["_pool"] = torch.cuda.graph_pool_handle()
        # On this tower's device and stream: torch's default capture stream belongs to the device that was
        # current when it was made, and a tower on another GPU would record nothing into the graph.
        try:
            with torch.cuda.device(x.device), torch.cuda.graph(graph, pool=self.__dict__["_pool"], stream=s):
                _copy_into(out, fn(sx, smask, inter_idx, ln_inter))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - ran in the warm-up above: the capture is what failed
            raise _CaptureFailed() from e
        return graph, sx, smask, out

    def free_device_memory(self) -> None:
        """The proxy's hook for an unload: the captured graphs (and their buffers) are recaptured when needed."""
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        # A fresh memory pool too: the old one belongs to the graphs being released. Replays queued on the
        # caller's stream may still use the workspace, which was allocated on a warm-up stream whose next
        # allocations could take it once freed: let the queued work finish first (an unload, a re-plan: rare).
        ws = self.__dict__.get("_workspace")
        if ws is not None and ws.device is not None and ws.device.type == "cuda" \
                and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(ws.device)
        self._graphs.clear()
        self.__dict__.pop("_pool", None)
        self.__dict__.pop("_workspace", None)
