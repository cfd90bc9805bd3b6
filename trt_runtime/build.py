"""ONNX -> serialized TensorRT engine: strongly typed network, one dynamic-batch optimization profile, progress.

Strongly typed: every tensor keeps the type the ONNX graph gives it (FP8 where Q/DQ say so, fp16 elsewhere),
which is what FP8 needs in TensorRT 10+ and TensorRT for RTX; no precision flags are involved.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..quant.errors import FP8ClipError
from .availability import PORTABLE
from .bindings import plan_from_network
from .flavour import RTX, Flavour
from .onnx_export import INPUT, PIXELS, TensorIO

log = logging.getLogger("comfyui-fp8-clip")

Progress = Callable[[float, str], None]  # (fraction 0..1, phase name)


class EngineBuildError(FP8ClipError):
    """TensorRT could not parse or build the network."""


@dataclass(frozen=True)
class Profile:
    """Batch rows the engine accepts: rows of 77 tokens (a prompt is 1 row per 77 tokens, +1 row when it has
    weights), or images for a vision engine."""
    max_rows: int = 8
    opt_rows: int = 2  # one row plus the empty row prompt weighting adds
    min_rows: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= self.opt_rows <= self.max_rows:
            raise FP8ClipError(f"Invalid engine profile: need 1 <= min_rows ({self.min_rows}) <= opt_rows "
                               f"({self.opt_rows}) <= max_rows ({self.max_rows}).")

    @classmethod
    def for_max_rows(cls, max_rows: int) -> "Profile":
        return cls(max_rows=max_rows, opt_rows=min(2, max_rows), min_rows=1)

    @classmethod
    def for_images(cls, max_images: int) -> "Profile":
        """Optimized for one image (IP-Adapter and unCLIP encode one reference at a time); batches up to max."""
        return cls(max_rows=max_images, opt_rows=1, min_rows=1)

    def to_dict(self) -> dict:
        return {"min_rows": self.min_rows, "opt_rows": self.opt_rows, "max_rows": self.max_rows}


@dataclass
class BuildResult:
    engine: bytes
    plan: list[TensorIO]
    parse_seconds: float
    build_seconds: float
    log: list[str] = field(default_factory=list)


def _logger(trt: Any) -> Any:
    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.interrupted: BaseException | None = None  # Ctrl-C landing here: TensorRT would swallow it

        def log(self, severity, msg):
            try:
                _record(trt, self.lines, severity, msg)
            except BaseException as e:  # noqa: BLE001  (re-raised after the builder returns)
                self.interrupted = self.interrupted or e
    return Log()


def _record(trt: Any, lines: list[str], severity: Any, msg: str) -> None:
    if severity <= trt.ILogger.Severity.WARNING:
        lines.append(f"{getattr(severity, 'name', severity)}: {msg}")
    if severity <= trt.ILogger.Severity.ERROR:  # warnings stay in .lines: builds emit many
        log.error("TensorRT: %s", msg)


def _monitor(trt: Any, progress: Progress | None, check_interrupt: Callable[[], None] | None, logger: Any) -> Any:
    """An IProgressMonitor turning TensorRT's nested phases into one fraction; cancels when interrupted."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.stack: list[list] = []  # [name, steps, done]
            self.interrupted: BaseException | None = None
            self.last = 0.0

        def fraction(self) -> float:
            f = 0.0
            for _, steps, done in reversed(self.stack):
                f = (min(done, steps) + f) / steps
            return f

        # Anything raised in a callback is swallowed by TensorRT ("Exception caught in phase_start()") and the
        # build runs on: ComfyUI's progress hook raises on Cancel (and clears its flag), and Ctrl-C lands in
        # whichever Python callback TensorRT calls next. Every callback keeps it; the next step stops the build.
        def _keep(self, e: BaseException) -> None:
            self.interrupted = self.interrupted or e

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                self.stack.append([phase_name, max(1, int(num_steps)), 0])
            except BaseException as e:  # noqa: BLE001  (re-raised after the builder returns)
                self._keep(e)

        def step_complete(self, phase_name, step):
            try:
                for entry in self.stack:
                    if entry[0] == phase_name:
                        entry[2] = int(step) + 1
                        del self.stack[self.stack.index(entry) + 1:]
                        break
                if logger.interrupted is not None or self.interrupted is not None:
                    return False
                if self.stack and progress:
                    self.last = max(self.last, self.fraction())
                    progress(self.last, phase_name)
                if check_interrupt:
                    check_interrupt()
            except BaseException as e:  # noqa: BLE001  (re-raised after the builder returns)
                self._keep(e)
                return False
            return True

        def phase_finish(self, phase_name):
            try:
                for i, entry in enumerate(self.stack):
                    if entry[0] == phase_name:
                        del self.stack[i:]
                        break
            except BaseException as e:  # noqa: BLE001  (re-raised after the builder returns)
                self._keep(e)
    return Monitor()


def _set_targets(flavour: Flavour, config: Any, target: str) -> None:
    # Standard TensorRT always builds for the GPU it runs on; TensorRT for RTX can target one compute
    # capability (device-specific engine) or, by default, every GPU it supports (portable).
    if flavour.name != RTX or target in (PORTABLE, ""):
        return
    capability = getattr(flavour.module.ComputeCapability, target.upper(), None)
    if capability is None:
        raise EngineBuildError(f"{flavour.label} cannot build for {target}: update it "
                               "(pip install -U tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings).")
    config.num_compute_capabilities = 1
    config.set_compute_capability(capability, 0)


def _start_builder(trt: Any, flavour: Flavour, log: Any) -> tuple[Any, Any, Any]:
    """Builder, network and parser; a TensorRT whose CUDA runtime cannot start raises what pybind11 makes of
    a null object (TypeError), which becomes a build error the node falls back on."""
    try:
        builder = trt.Builder(log)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        return builder, network, trt.OnnxParser(network, log)
    except Exception as e:  # noqa: BLE001 - any failure here is TensorRT's set-up, not the model
        raise EngineBuildError(f"{flavour.label} could not start its builder ({type(e).__name__}: "
                               f"{e}). Usually the GPU driver is older than this TensorRT needs: update the "
                               "driver, or install a TensorRT that matches it.") from e


def build_engine(onnx_model: Any, profile: Profile, flavour: Flavour, *, target: str = PORTABLE,
                 progress: Progress | None = None, check_interrupt: Callable[[], None] | None = None
                 ) -> BuildResult:
    """Parse `onnx_model` (ModelProto or bytes) and build a serialized engine with `flavour`'s builder."""
    trt = flavour.module
    data = onnx_model if isinstance(onnx_model, (bytes, bytearray)) else onnx_model.SerializeToString()
    log = _logger(trt)
    builder, network, parser = _start_builder(trt, flavour, log)
    t0 = time.perf_counter()
    if not parser.parse(data):
        if log.interrupted is not None:  # Ctrl-C in the logger's callback: that, not the parse error it caused
            raise log.interrupted
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{flavour.label} could not parse the exported ONNX graph: {'; '.join(errors)}")
    parse_s = time.perf_counter() - t0
    plan = plan_from_network(network)
    inputs = [t for t in plan if t.mode == "input"]
    if len(inputs) != 1 or inputs[0].name not in (INPUT, PIXELS):
        raise EngineBuildError(f"The exported graph must have one input, {INPUT!r} or {PIXELS!r}; it has "
                               f"{[t.name for t in inputs]}.")
    inp = inputs[0]
    config = builder.create_builder_config()
    _set_targets(flavour, config, target)
    opt = builder.create_optimization_profile()
    seq_width = inp.shape[1:]  # [77, width] tokens or [3, H, W] pixels: only the batch is dynamic
    opt.set_shape(inp.name, (profile.min_rows, *seq_width), (profile.opt_rows, *seq_width),
                  (profile.max_rows, *seq_width))
    config.add_optimization_profile(opt)
    monitor = None
    if hasattr(trt, "IProgressMonitor"):
        monitor = _monitor(trt, progress, check_interrupt, log)
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    stopped = (monitor.interrupted if monitor is not None else None) or log.interrupted
    if stopped is not None:
        raise stopped
    if serialized is None:
        detail = "; ".join(log.lines[-5:]) or "no message from TensorRT"
        raise EngineBuildError(f"{flavour.label} failed to build the engine (target {target}): {detail}")
    if progress:
        progress(1.0, "done")
    return BuildResult(bytes(serialized), plan, parse_s, build_s, list(log.lines))
