"""What executes the exported transformer: a TensorRT engine on the GPU, or onnxruntime on the CPU.

A runner takes the graph's one input (token embeddings [rows, 77, width], or pixel values [images, 3, H, W] for
a vision engine; float32) and returns (last_hidden, hidden_states) as float32 torch tensors on its own device.
`EngineTextModel` / `EngineVisionModel` do everything else in torch.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

import torch

from ..quant.errors import FP8ClipError
from .bindings import EngineMismatchError, allocate_outputs, check_plan, plan_from_engine
from .flavour import Flavour
from .onnx_export import HIDDEN_STATES, LAST_HIDDEN, TensorIO


# ComfyUI reuses a node's last result while its inputs are unchanged; the engine nodes' IS_CHANGED (watch.py)
# makes them run again once the file is gone. The quantize node's `tensorrt` runtime has no such watch.
REBUILD = ("Delete that engine file (its folder is models/tensorrt unless extra_model_paths says otherwise) and "
           "queue the prompt again: the 'Build TensorRT Engine' node runs again "
           "when its engine file is gone, and rebuilds it (with the Quantize node's 'tensorrt' runtime, change one "
           "of that node's inputs or restart ComfyUI).")


class EngineLoadError(FP8ClipError):
    """TensorRT refused to load the engine on this GPU."""


class Runner(Protocol):
    device: torch.device

    def __call__(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def release(self) -> None: ...

    def device_bytes(self) -> int: ...


class TrtRunner:
    """Runs a serialized engine on a CUDA device, bound to torch tensors and torch's current stream.

    The engine is deserialized on first use and released by `release()` (when ComfyUI offloads the text
    encoder), so its GPU memory follows ComfyUI's loads and unloads.
    """

    def __init__(self, engine_bytes: Callable[[], bytes], plan: list[TensorIO], flavour: Flavour,
                 device: torch.device, engine_file_bytes: int, name: str = "the engine"):
        self.device = torch.device(device)
        self.plan = plan
        self.input = next(t.name for t in plan if t.mode == "input")
        self.flavour = flavour
        self.name = name  # for messages: the file to delete when it cannot be loaded (after an offload, say)
        self._read = engine_bytes
        self._file_bytes = engine_file_bytes
        self._engine = self._context = self._runtime = self._log = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Deserialize the engine and create its execution context (done on first use otherwise)."""
        trt = self.flavour.module
        from .build import _logger

        blob = self._read()
        log = _logger(trt)
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(log)
            if hasattr(runtime, "get_engine_validity"):  # TensorRT for RTX: check before deserializing
                validity, diagnostics = runtime.get_engine_validity(blob)
                if getattr(validity, "name", str(validity)) == "INVALID":
                    raise EngineLoadError(f"{self.flavour.label} reports {self.name} invalid on this GPU "
                                          f"(diagnostics {diagnostics}: {'; '.join(log.lines[-3:])}). {REBUILD}")
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise EngineLoadError(f"{self.flavour.label} could not load {self.name}: "
                                      f"{'; '.join(log.lines[-3:]) or 'no message'}. {REBUILD}")
            check_plan(plan_from_engine(engine), self.plan)
            context = engine.create_execution_context()
            if context is None:
                said = "; ".join(log.lines[-3:]) or "no message"
                raise EngineLoadError(f"TensorRT could not create an execution context for {self.name} ({said}). If "
                                      "the GPU is out "
                                      "of memory: free some (unload other models), or rebuild the engine with a "
                                      "smaller max_batch_rows / max_images.")
        self._runtime, self._engine, self._context, self._log = runtime, engine, context, log

    def __call__(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # TensorRT runs on the current CUDA device: make it the engine's (a CLIP vision on cuda:1, say).
        with self._lock, torch.cuda.device(self.device):
            if self._context is None:
                self.load()
            x = embeds.to(self.device, torch.float32).contiguous()
            outs = allocate_outputs(self.plan, x.shape[0], self.device)
            ctx = self._context
            if not ctx.set_input_shape(self.input, tuple(x.shape)):
                raise EngineMismatchError(f"The engine refused input shape {tuple(x.shape)}.")
            ctx.set_tensor_address(self.input, x.data_ptr())
            for name, t in outs.items():
                ctx.set_tensor_address(name, t.data_ptr())
            # The engine runs on torch's current stream, so torch ops before and after are ordered with it.
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                said = "; ".join(self._log.lines[-3:]) or "no message from TensorRT"
                raise RuntimeError(f"TensorRT failed to run the engine ({said}).")
            return outs[LAST_HIDDEN], outs[HIDDEN_STATES]

    def release(self) -> None:
        with self._lock:
            if self._context is not None:  # work it queued may still run: a context must outlive it
                torch.cuda.synchronize(self.device)
            self._context = self._engine = self._runtime = self._log = None

    def device_bytes(self) -> int:
        """GPU memory of the loaded engine: weights (about its file size) plus activation memory."""
        if self._engine is not None:
            return self._file_bytes + int(self._engine.device_memory_size_v2)
        return self._file_bytes


class OrtRunner:
    """Runs the exported ONNX graph with onnxruntime on the CPU: the reference the engine is tested against."""

    def __init__(self, onnx_model: Any):
        import onnxruntime as ort

        data = onnx_model if isinstance(onnx_model, (bytes, bytearray)) else onnx_model.SerializeToString()
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")

    def __call__(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last, hidden = self.session.run([LAST_HIDDEN, HIDDEN_STATES],
                                        {self.input: embeds.detach().to("cpu", torch.float32).contiguous().numpy()})
        return torch.from_numpy(last), torch.from_numpy(hidden)

    def release(self) -> None:
        pass

    def device_bytes(self) -> int:
        return 0
