"""Quantized CLIP (or CLIP_VISION) in -> a clone whose transformer runs on a cached TensorRT engine, with a status.

export (only when the engine is not cached) -> build -> cache -> runner -> `EngineTextModel` / `EngineVisionModel`
swapped into a new clone (`quant.patching.clone_with`). Where the engine cannot run, the input comes back
unchanged (its PyTorch FP8 path keeps working) and the status says why.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..quant import artifact
from ..quant.errors import FP8ClipError
from ..quant.patching import clone_with, weight_bytes
from ..quant.proxy import refuse_later_weight_patches
from .availability import Support
from .bindings import EngineMismatchError, plan_from_dicts
from .build import BuildResult, EngineBuildError, Profile, Progress, build_engine
from .cache import CachedEngine, EngineCache, EngineCacheError, engine_key
from .engine_module import EngineTextModel, EngineTower, EngineVisionModel
from .onnx_export import EXPORT_VERSION, TransformerSpec, build_onnx, spec_from_module
from .runners import EngineLoadError, Runner, TrtRunner
from .watch import EngineUse

log = logging.getLogger("comfyui-fp8-clip")

# Precision of everything between the FP8 GEMMs. float32 reproduces the PyTorch FP8 path (and so the quality
# report) to 0.999+ cosine; float16 moves less memory but rounds every activation again (0.998 on the test
# fixture). As the PyTorch FP8 runtime does on GPUs, float32 is the default.
ACTIVATIONS = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Engine:
    """An engine ready to hand to a runner: on disk (cached) or, when the cache is unusable, in memory."""
    key: str
    manifest: dict[str, Any]
    built: bool
    path: Path | None
    data: bytes | None = None
    note: str = ""
    cache: EngineCache | None = None
    tower: str = ""

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return CachedEngine(self.path, self.manifest, built=self.built).read()
        except EngineCacheError:
            # Read again after ComfyUI offloaded the model, the file may be another process's build of this key
            # (builds are not byte-identical): an intact engine of the same key has the same inputs and outputs.
            found = self.cache.check(self.key, self.manifest["components"], self.tower)[0] if self.cache else None
            if found is None:
                raise
            self.manifest, self.path = found.manifest, found.path
            return found.read()


def components(spec: TransformerSpec, support: Support, profile: Profile, activations: str) -> dict[str, Any]:
    """Everything that changes the engine (the cache key is their hash)."""
    return {"export": spec.digest(ACTIVATIONS[activations], fp8=True), "export_version": EXPORT_VERSION,
            "compute_dtype": activations, "fp8": True,
            "flavour": support.flavour.name, "trt_version": support.flavour.version, "target": support.target,
            "profile": profile.to_dict()}


def prepare_engine(module: torch.nn.Module, record: Any, *, profile: Profile, support: Support,
                   cache: EngineCache | None, activations: str = "float32", progress: Progress | None = None,
                   check_interrupt: Callable[[], None] | None = None, from_memory: bool = True) -> Engine:
    """The engine for this quantized tower: from the cache when it holds it intact, else exported and built.
    Where the cache cannot keep it, the engine is used from memory (`from_memory`), else EngineCacheError."""
    if activations not in ACTIVATIONS:
        raise FP8ClipError(f"Unknown activation precision {activations!r}; use one of {', '.join(ACTIVATIONS)}.")
    spec = spec_from_module(module, record)
    comps = components(spec, support, profile, activations)
    key = engine_key(comps)
    describe = {**spec.meta, "kind": spec.kind, "fp8_layers": sum(lin.fp8 for lin in spec.linears()),
                "layers": len(spec.blocks), "width": spec.width}

    def build() -> BuildResult:
        if progress:
            progress(0.0, "exporting ONNX")
        model = build_onnx(spec, compute_dtype=ACTIVATIONS[activations], fp8=True)
        if progress:
            progress(0.05, "building engine")
        scaled = (lambda f, phase: progress(0.05 + 0.95 * f, phase)) if progress else None
        # Standard TensorRT builds for the current GPU: make it the one the engine will run on (cuda:1 for a
        # CLIP a multi-GPU loader put there), whose name is in the cache key. (TensorRT for RTX builds without one.)
        dev = support.device
        on_gpu = dev is not None and torch.device(dev).type == "cuda" and torch.cuda.is_available()
        with torch.cuda.device(dev) if on_gpu else nullcontext():
            return build_engine(model, profile, support.flavour, target=support.target, progress=scaled,
                                check_interrupt=check_interrupt)

    if cache is not None:
        try:
            found = cache.get_or_build(key, comps, build, tower=record.tower, describe=describe,
                                       check_interrupt=check_interrupt)
            note = " ".join(found.warnings)
            return Engine(key, found.manifest, found.built, found.path, note=note, cache=cache, tower=record.tower)
        except EngineCacheError as e:
            if not from_memory:
                raise
            if e.result is None:
                result = build()
            else:
                result = e.result
            log.warning("%s The engine is used from memory and rebuilt next time.", e)
            return _in_memory(key, comps, result, f"Not cached: {e}")
    return _in_memory(key, comps, build(), "")


def _in_memory(key: str, comps: dict[str, Any], result: BuildResult, note: str) -> Engine:
    manifest = {"key": key, "components": comps, "engine_bytes": len(result.engine),
                "io": [t.to_dict() for t in result.plan], "build_seconds": round(result.build_seconds, 3)}
    return Engine(key, manifest, True, None, data=result.engine, note=note)


def make_runner(engine: Engine, support: Support, module: torch.nn.Module, record: Any) -> Runner:
    """The TensorRT runner for `engine`, loaded now so a GPU that refuses it is found before any encode (and
    kept: TensorRT for RTX compiles kernels for the GPU at run time, which a reload would repeat). Its memory is
    in the size the node reports to ComfyUI, which budgets it when the model is loaded for the first encode.
    (`module`, `record`: for runners that run the exported graph themselves, as the tests' onnxruntime stand-in.)"""
    name = f"the engine {engine.path}" if engine.path else "the engine (in memory: its folder could not keep it)"
    runner = TrtRunner(engine.read, plan_from_dicts(engine.manifest["io"]), support.flavour, support.device,
                       engine.manifest["engine_bytes"], name)
    runner.load()
    return runner


def _how(engine: Engine) -> str:
    return f"built in {engine.manifest.get('build_seconds', 0):.1f} s" if engine.built else "found in the cache, no build"


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


@dataclass(frozen=True)
class Target:
    """What differs between engining a CLIP and a CLIP_VISION: words for the status and the drop-in module."""
    noun: str  # "CLIP" | "CLIP_VISION"
    source_node: str  # the node whose output this needs
    wrap: Callable[[torch.nn.Module, Runner, Profile, Engine, str], EngineTower]


TEXT = Target("CLIP", "'Quantize CLIP to FP8 (calibrated)'",
              lambda m, r, p, e, s: EngineTextModel(m, r, max_rows=p.max_rows, status=s))


def _pixels(engine: Engine) -> tuple[int, ...]:
    (inp,) = [t for t in plan_from_dicts(engine.manifest["io"]) if t.mode == "input"]
    return tuple(inp.shape[1:])


VISION = Target("CLIP_VISION", "'Quantize CLIP Vision to FP8 (calibrated)'",
                lambda m, r, p, e, s: EngineVisionModel(m, r, max_rows=p.max_rows, pixels=_pixels(e), status=s))


def engine_clip(clip: Any, max_rows: int, support: Support, *, cache_root: str | Path | None,
                activations: str = "float32", progress: Progress | None = None,
                check_interrupt: Callable[[], None] | None = None, used: EngineUse | None = None) -> tuple[Any, str]:
    """(CLIP on the engine, status); or (the input CLIP, status saying why not) where the engine cannot run.
    `used` gets the cached engine files it prepared, loaded or not, and whether a failure may pass on a retry
    (what the node watches)."""
    profile = Profile.for_max_rows(max_rows)
    header = (f"  profile: 1 to {profile.max_rows} rows of 77 tokens (max_batch_rows); FP8 matmuls, {activations} "
              "activations")
    return _engine_model(clip, TEXT, profile, header, support, cache_root=cache_root, activations=activations,
                         progress=progress, check_interrupt=check_interrupt, used=used)


def engine_clip_vision(clip_vision: Any, max_images: int, support: Support, *, cache_root: str | Path | None,
                       activations: str = "float32", progress: Progress | None = None,
                       check_interrupt: Callable[[], None] | None = None, used: EngineUse | None = None
                       ) -> tuple[Any, str]:
    """(CLIP_VISION on the engine, status); or (the input, status saying why not) where the engine cannot run.
    `used`: as for engine_clip."""
    profile = Profile.for_images(max_images)
    header = f"  profile: 1 to {profile.max_rows} images (max_images); FP8 matmuls, {activations} activations"
    return _engine_model(clip_vision, VISION, profile, header, support, cache_root=cache_root,
                         activations=activations, progress=progress, check_interrupt=check_interrupt, used=used)


def prebuild(model: Any, vision: bool, max_rows: int, support: Support, *, cache_root: str | Path,
             activations: str = "float32", progress: Progress | None = None) -> list[str]:
    """Build (or find) the cached engines of a quantized CLIP / CLIP_VISION without loading them: for the
    command line, ahead of time. The node then finds them under the same key (same profile and target)."""
    towers = artifact.quantized_towers(model)
    if not towers:
        raise FP8ClipError("The model is not quantized by this pack: give a file saved by 'Save FP8 CLIP' / "
                           "'Save FP8 CLIP Vision' or by `quantize`.")
    if not support.ok:
        raise FP8ClipError(f"No engine can be built here: {support.reason}")
    profile = Profile.for_images(max_rows) if vision else Profile.for_max_rows(max_rows)
    cache = EngineCache(cache_root)
    lines = []
    for module, record in towers.values():
        try:  # an engine the cache cannot keep is of no use to the node: no build in memory for nothing
            engine = prepare_engine(module, record, profile=profile, support=support, cache=cache,
                                    activations=activations, progress=progress, from_memory=False)
        except EngineCacheError as e:
            raise FP8ClipError(f"{record.tower}: the engine cache cannot keep the engine, so the node would not "
                               f"find it: {e}") from e
        how = _how(engine)
        lines.append(f"{record.tower}: {how} ({_mb(engine.manifest['engine_bytes'])}) {engine.path}")
    return lines


def _engine_model(model: Any, target: Target, profile: Profile, header: str, support: Support, *,
                  cache_root: str | Path | None, activations: str, progress: Progress | None,
                  check_interrupt: Callable[[], None] | None, used: EngineUse | None = None) -> tuple[Any, str]:
    towers = artifact.quantized_towers(model) if model is not None and hasattr(model, "patcher") else {}
    if not towers:
        raise FP8ClipError(f"This {target.noun} is not quantized by this pack. Connect the output of "
                           f"{target.source_node} to this node.")
    if any(isinstance(m, EngineTower) for m, _ in towers.values()):
        raise FP8ClipError(f"This {target.noun} already runs on a TensorRT engine. Connect the output of "
                           f"{target.source_node} instead.")
    for path in towers:  # the engine would be built from the FP8 weights without them
        refuse_later_weight_patches(model.patcher, path)
    fallback = f"The {target.noun} keeps running in PyTorch (same FP8 numerics, no engine)."
    if not support.ok:
        return model, f"TensorRT engine not used: {support.reason}\n{fallback}"
    # A build or load that failed may work next time (GPU memory freed, folder fixed): the engine nodes run
    # again at the next queue (watch.EngineUse.retry), as ComfyUI reruns a node that failed.
    retry = fallback + (" Queuing again tries again (bypass this node to stop)." if used is not None else "")
    cache = EngineCache(cache_root) if cache_root is not None else None
    size = model.patcher.model_size()
    swaps = {}
    lines = [f"TensorRT engine: {support.reason}", header]
    for path, (module, record) in towers.items():
        try:
            engine = prepare_engine(module, record, profile=profile, support=support, cache=cache,
                                    activations=activations, progress=progress, check_interrupt=check_interrupt)
        except (EngineBuildError, EngineCacheError) as e:
            log.warning("TensorRT engine not used: %s", e)
            if used is not None:
                used.retry = True
            return model, f"TensorRT engine not used: {e}\n{retry}"
        if used is not None and engine.path is not None:
            used.paths.append(engine.path)
        try:
            runner = make_runner(engine, support, module, record)
        except Exception as e:  # noqa: BLE001  (whatever the GPU/driver/TensorRT says: fall back, never crash)
            msg = str(e) if isinstance(e, (EngineLoadError, EngineMismatchError)) else f"{type(e).__name__}: {e}"
            log.warning("TensorRT engine not used: could not load it: %s", msg)
            if used is not None:
                used.retry = True
            named = f" {engine.path}" if engine.path else ""
            return model, (f"TensorRT engine not used: the engine{named} is ready but could not be loaded ({msg})."
                           f"\n{retry}")
        how = _how(engine)
        where = f", {engine.path}" if engine.path else ""
        status = f"  {record.tower}: {how} ({_mb(engine.manifest['engine_bytes'])}, FP8 weights){where}"
        lines.append(status + (f"\n  note: {engine.note}" if engine.note else ""))
        em = target.wrap(module, runner, profile, engine, status.strip())
        swaps[path] = em
        # ComfyUI sizes models from their state_dict; the engine's memory is not in it, so say it here.
        size += em.vram_bytes() - weight_bytes(module)
    out = clone_with(model, swaps)
    out.patcher.size = max(int(size), 1)
    lines.append(f"  memory reported to ComfyUI: {_mb(out.patcher.size)}")
    gpu = support.device
    if gpu is not None and gpu.type == "cuda" and torch.device(model.patcher.load_device).type != "cuda":
        lines.append(f"  ComfyUI runs this {target.noun} on {model.patcher.load_device} (--lowvram, --novram or the "
                     f"loader's device): the engine runs on {gpu} and is loaded for each encode, not "
                     "kept there")
    return out, "\n".join(lines)
