"""The I/O binding plan: names, modes, dtypes and shapes of an engine's tensors, and torch buffers for them.

The plan is read from the TensorRT network at build time (stored in the manifest) and checked against the
deserialized engine before its first run, so an engine that does not have the I/O the runtime binds is
refused with a clear message instead of reading or writing the wrong memory.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..quant.errors import FP8ClipError
from .onnx_export import TensorIO

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "uint8": torch.uint8,
          "int8": torch.int8}
_TRT = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
        "BOOL": "bool", "FP8": "float8_e4m3fn", "UINT8": "uint8", "INT8": "int8"}


class EngineMismatchError(FP8ClipError):
    """The engine's I/O is not what this runtime binds: it was built by another version or edited."""


def dtype_name(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    return _TRT.get(name, name.lower())


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[name]


def plan_from_network(network: Any) -> list[TensorIO]:
    """The plan of a parsed TensorRT INetworkDefinition (no GPU needed)."""
    out = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        out.append(TensorIO(t.name, "input", dtype_name(t.dtype), tuple(int(d) for d in t.shape)))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        out.append(TensorIO(t.name, "output", dtype_name(t.dtype), tuple(int(d) for d in t.shape)))
    return out


def plan_from_engine(engine: Any) -> list[TensorIO]:
    """The plan of a deserialized ICudaEngine (needs the GPU the engine was deserialized on)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if getattr(engine.get_tensor_mode(name), "name", "") == "INPUT" else "output"
        out.append(TensorIO(name, mode, dtype_name(engine.get_tensor_dtype(name)),
                            tuple(int(d) for d in engine.get_tensor_shape(name))))
    return out


def plan_from_dicts(items: Iterable[dict]) -> list[TensorIO]:
    return [TensorIO(d["name"], d["mode"], d["dtype"], tuple(d["shape"])) for d in items]


def check_plan(actual: list[TensorIO], expected: list[TensorIO]) -> None:
    """Raise EngineMismatchError naming every difference between two plans (order does not matter)."""
    a, e = {t.name: t for t in actual}, {t.name: t for t in expected}
    problems = [f"missing {n!r}" for n in e if n not in a] + [f"unexpected {n!r}" for n in a if n not in e]
    for n in e.keys() & a.keys():
        if a[n] != e[n]:
            problems.append(f"{n!r} is {a[n].mode} {a[n].dtype}{list(a[n].shape)}, expected "
                            f"{e[n].mode} {e[n].dtype}{list(e[n].shape)}")
    if problems:
        raise EngineMismatchError("The TensorRT engine's inputs/outputs do not match this version of the pack ("
                                  + "; ".join(sorted(problems)) + "). Delete the engine file to rebuild it.")


def concrete_shape(t: TensorIO, rows: int) -> tuple[int, ...]:
    """The tensor's shape for a batch of `rows` (the only dynamic dimension)."""
    if sum(d < 0 for d in t.shape) > 1:
        raise EngineMismatchError(f"{t.name!r} has more than one dynamic dimension {list(t.shape)}.")
    return tuple(rows if d < 0 else d for d in t.shape)


def allocate_outputs(plan: list[TensorIO], rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(concrete_shape(t, rows), dtype=torch_dtype(t.dtype), device=device)
            for t in plan if t.mode == "output"}
