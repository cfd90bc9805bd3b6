"""CLIP_VISION in -> calibrated FP8 CLIP_VISION out, with its quality report.

Calibration runs through ComfyUI's own ClipVisionModel.encode_image (its preprocessing, its penultimate-layer
output), like the text path runs through CLIPTextEncode's. The patch embedding is never quantized (NVIDIA's
recipe keeps it in high precision; it is a convolution on raw pixels).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import artifact, calibration_memo, modelopt_bridge
from .errors import FP8ClipError, UnsupportedModelError
from .fidelity import LayerErrorProbe, below, calibrated_on, keep_advice, unmatched_warning, worst
from .fp8_ops import require_fp8_storage
from .images import calibration_images, check_images, held_out_images, synthetic_images
from .patching import checkpoint_dtype, clone_with, patched_copy, to_float32, weight_bytes, weights_fingerprint
from .proxy import load_towers
from .recipe import Recipe, fingerprint

PATH = "vision_model"
DEFAULT_VISION_KEEP = ("*patch_embedding*",)
SUPPORTED_VISION = ("CLIP vision models (ViT-L/14, ViT-L/14-336, ViT-H/14, ViT-bigG/14: IP-Adapter, unCLIP); "
                    "not SigLIP encoders such as Flux Redux's")
SIZES = {(1024, 24): "ViT-L/14", (1280, 32): "ViT-H/14", (1664, 48): "ViT-bigG/14"}


def require_clip_vision(cv: Any) -> str:
    """The model's name (e.g. 'ViT-L/14'); a clear error for anything the pack cannot quantize."""
    if cv is None:
        raise FP8ClipError("No CLIP_VISION is connected. Connect the output of Load CLIP Vision.")
    if not all(hasattr(cv, a) for a in ("patcher", "model", "encode_image")):
        raise FP8ClipError(f"Expected a CLIP_VISION (from Load CLIP Vision), got {type(cv).__name__}.")
    model_type = getattr(cv, "model_type", None) or getattr(getattr(cv, "model", None), "model_type", None)
    from .proxy import unwrap

    try:  # through object patches: the shared model may hold another clone's FP8 tower right now
        vm = unwrap(cv.patcher.get_model_object(PATH))
    except AttributeError:
        vm = None
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if (model_type not in (None, "clip_vision_model") or layers is None
            or getattr(vm, "embeddings", None) is None or getattr(vm.embeddings, "class_embedding", None) is None):
        raise UnsupportedModelError(
            f"This image encoder ({model_type or type(cv.model).__name__}) is not a CLIP vision transformer the "
            f"pack knows. Supported: {SUPPORTED_VISION}. Use it without the FP8 node.")
    width = layers[0].layer_norm1.weight.shape[0]
    name = SIZES.get((width, len(layers)), f"CLIP vision {len(layers)} layers x {width}")
    size = getattr(cv, "image_size", 224)
    return name + (f" ({size}px)" if size != 224 else "")


def embed(cv: Any, images: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """image_embeds and penultimate hidden states, as CLIPVisionEncode (crop=center) gives them."""
    embeds, hidden = [], []
    for i in range(0, images.shape[0], batch):
        out = cv.encode_image(images[i:i + batch], crop=True)
        embeds.append(out["image_embeds"].float().cpu())
        hidden.append(out["penultimate_hidden_states"].float().cpu())
    return torch.cat(embeds), torch.cat(hidden)


@dataclass
class VisionReport:
    model: str
    scope: str
    method: str
    quantized: int
    kept: list[str]
    embed_cos: list[float]
    hidden_cos: list[float]
    agreement: float
    agreement_n: int
    layer_errors: dict[str, float]
    calibration_images: int
    calibration_seconds: float
    evaluation_seconds: float
    min_cosine: float
    keep: tuple[str, ...] = ()
    unmatched_patterns: list[str] = field(default_factory=list)
    overlap: int = 0  # held-out images that are calibration images too
    reused: str = ""  # set when this report and its scales come from an earlier run (calibration_memo)

    def checks(self) -> list[tuple[str, float]]:
        """The worst score of each output the threshold applies to: IP-Adapter uses the hidden states."""
        return [("image_embeds", worst(self.embed_cos)), ("penultimate hidden states", worst(self.hidden_cos))]

    def worst_layers(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:n]

    @property
    def below_threshold(self) -> bool:
        return any(below(v, self.min_cosine) for _, v in self.checks())

    def warnings(self) -> list[str]:
        out = [unmatched_warning(p, self.layer_errors) for p in self.unmatched_patterns]
        if self.overlap:
            out.append(f"{self.overlap} of the {len(self.embed_cos)} evaluation images are calibration images too: "
                       "their scores are not held out and can look better than the quantization is. Connect other "
                       "images to evaluation_images.")
        if self.below_threshold:
            low = ", ".join(f"{n} {v:.5f}" for n, v in self.checks() if below(v, self.min_cosine))
            out.append(f"Quality below your threshold {self.min_cosine:.6g} (worst image: {low}). "
                       + keep_advice(self.layer_errors, self.keep, self.unmatched_patterns))
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": self.warnings()}

    def text(self) -> str:
        def mm(v: list[float]) -> str:
            return f"{worst(v):.4f} / {sum(v) / len(v):.4f}"
        lines = [f"FP8 E4M3 CLIP vision quality report: {self.model}, {self.scope}, per-tensor static scales",
                 f"  {self.quantized} Linear layers in FP8; kept in high precision: "
                 f"{', '.join(f'{PATH}.{k}' for k in self.kept) or 'none'}",
                 f"Cosine vs the unquantized encoder on {len(self.embed_cos)} held-out images (min / mean):",
                 f"  image_embeds               {mm(self.embed_cos)}",
                 f"  penultimate hidden states  {mm(self.hidden_cos)} (what IP-Adapter uses)",
                 f"Nearest-prototype labels (zero-shot style, 10 synthetic prototypes): FP8 agrees with the original on "
                 f"{round(self.agreement * self.agreement_n)}/{self.agreement_n} images ({self.agreement:.0%})",
                 f"Calibration: {calibrated_on(self.scope, self.calibration_images, 'images')}, method '{self.method}', "
                 f"{self.calibration_seconds:.1f} s (evaluation {self.evaluation_seconds:.1f} s)",
                 *([self.reused] if self.reused else []),
                 "Largest per-layer output errors: " + ", ".join(f"{n} {e:.1%}" for n, e in self.worst_layers())]
        return "\n".join(lines + [f"WARNING: {w}" for w in self.warnings()])


def image_digest(images: torch.Tensor) -> str:
    """Identifies a calibration set by its pixels (its shape alone named different sets alike)."""
    t = images.detach().to("cpu", torch.float32).contiguous()
    return f"images:{tuple(t.shape)}:{hashlib.sha256(t.numpy().tobytes()).hexdigest()}"


def shared_images(test: torch.Tensor, calibration: torch.Tensor) -> int:
    """How many of the evaluation images are calibration images too."""
    return sum(any(c.shape == t.shape and torch.equal(c, t) for c in calibration) for t in test)


def label_agreement(ref: torch.Tensor, got: torch.Tensor, protos: torch.Tensor) -> float:
    """Share of images whose nearest prototype (cosine) is the same for both encoders."""
    p = F.normalize(protos, dim=-1)
    a = (F.normalize(ref, dim=-1) @ p.T).argmax(-1)
    b = (F.normalize(got, dim=-1) @ p.T).argmax(-1)
    return float((a == b).float().mean())


def quantize_clip_vision(cv: Any, images: torch.Tensor | None, recipe: Recipe, *, min_cosine: float = 0.99,
                         held_out: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None,
                         check_interrupt: Callable[[], None] = lambda: None) -> tuple[Any, VisionReport]:
    """Calibrate FP8 scales for the vision transformer of `cv`; return the quantized copy and its report."""
    # Before the model check: a CLIP_VISION on a TensorRT engine has no encoder left to recognise. Other image
    # encoders (DINOv2, DINOv3) have no vision_model at all: require_clip_vision names them.
    try:
        tower = cv.patcher.get_model_object(PATH) if hasattr(cv, "patcher") else None
    except AttributeError:
        tower = None
    if tower is not None and artifact.record_of(tower) is not None:
        raise FP8ClipError("This CLIP_VISION is already quantized to FP8 by this pack ('Quantize CLIP Vision to FP8' "
                           "or 'Load FP8 CLIP Vision'). Connect the original one from Load CLIP Vision instead.")
    model = require_clip_vision(cv)
    require_fp8_storage(cv.patcher.load_device, "CLIP vision model")
    modelopt_bridge.load_modelopt()  # before the minutes of encodes that come first
    weights_only = not recipe.quantize_activations  # scales from the weights alone: no calibration encode
    if not weights_only:
        images = calibration_images() if images is None else check_images(images)
    test = held_out_images()[0] if held_out is None else check_images(held_out, "evaluation images")
    batches = [] if weights_only else [images[i:i + 8] for i in range(0, images.shape[0], 8)]
    calibration_digest = "" if weights_only else image_digest(images)
    memo_key = calibration_memo.key("vision", getattr(cv.patcher, "patches_uuid", ""), calibration_digest,
                                    image_digest(test), recipe.to_json(), weights_fingerprint(cv.patcher, [PATH]))
    earlier = calibration_memo.recall(cv, memo_key)
    total, done = len(batches) + 2, 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    # The original's embeddings for the report first, while ComfyUI has the GPU to itself (quant/calibrate.py).
    t0 = time.perf_counter()
    check_interrupt()
    if not earlier:
        protos = embed(cv, synthetic_images(10, seed=4242)[0])[0]  # one prototype image per kind
        ref_e, ref_h = embed(cv, test)
    ref_s = time.perf_counter() - t0
    copy_ = patched_copy(cv, PATH)
    check_interrupt()  # between the steps of seconds each (ViT-H): the cancel button answers within one
    source_bytes = weight_bytes(copy_)
    dtype = checkpoint_dtype(copy_)  # before the fp32 cast
    qcv = clone_with(cv, {PATH: copy_})
    if earlier or weights_only:  # no calibration encode will take the copy to the GPU: the work below runs there
        load_towers(qcv.patcher, [PATH], grow=2)
    container = torch.nn.ModuleDict({PATH: copy_})
    linears = modelopt_bridge.linear_layer_names(container)
    convs = [n for n, m in container.named_modules() if isinstance(m, torch.nn.Conv2d)]
    to_quantize, kept, unmatched = recipe.split(linears + convs)
    to_quantize = [n for n in to_quantize if n in linears]
    kept = kept + [c for c in convs if c not in kept]  # convolutions are never quantized
    unusable = modelopt_bridge.nonfinite_weight_layers(container, to_quantize)
    to_quantize, kept = [n for n in to_quantize if n not in unusable], kept + unusable
    recipe.require_layers(to_quantize, len(linears), unusable, vision=True)
    # Original weights (checkpoint dtype, CPU) for the per-layer errors; taken before the fp32 cast.
    reference = {} if earlier else {n: container.get_submodule(n).weight.detach().to("cpu", copy=True)
                                    for n in to_quantize}
    to_float32(copy_)
    check_interrupt()
    config = recipe.modelopt_config([k for k in kept if k in linears])
    prefix = PATH + "."

    def forward_loop(_: torch.nn.Module) -> None:
        for b in batches:
            check_interrupt()
            qcv.encode_image(b, crop=True)
            step()

    if earlier:
        modelopt_bridge.quantize_calibrated(container, config, earlier.amax)
        check_interrupt()
        scales = modelopt_bridge.quantized_layers(container)
        modelopt_bridge.fold_weights(container)
        report = replace(earlier.report, min_cosine=min_cosine,
                         reused=calibration_memo.reused_line(earlier, weights_only))
    else:
        t0 = time.perf_counter()
        modelopt_bridge.quantize(container, config, None if weights_only else forward_loop)
        calib_s = time.perf_counter() - t0
        scales = modelopt_bridge.quantized_layers(container)
        amax = modelopt_bridge.calibration_state(container)
        modelopt_bridge.fold_weights(container)

        t0 = time.perf_counter()
        step()
        probe = LayerErrorProbe(container, reference, keep=(qcv.patcher,))
        try:
            check_interrupt()
            got_e, got_h = embed(qcv, test)
        finally:
            errors = probe.close()
        step()
        eval_s = time.perf_counter() - t0 + ref_s

        report = VisionReport(
            model=model, scope=recipe.scope, method=recipe.method, quantized=len(scales),
            kept=[k[len(prefix):] for k in kept], embed_cos=F.cosine_similarity(ref_e, got_e, dim=-1).tolist(),
            hidden_cos=[float(F.cosine_similarity(a, b, dim=-1).mean()) for a, b in zip(ref_h, got_h)],
            agreement=label_agreement(ref_e, got_e, protos), agreement_n=test.shape[0], layer_errors=errors,
            calibration_images=0 if weights_only else images.shape[0], calibration_seconds=calib_s,
            evaluation_seconds=eval_s, min_cosine=min_cosine, keep=recipe.keep, unmatched_patterns=unmatched,
            overlap=0 if weights_only else shared_images(test, images))
        calibration_memo.remember(cv, memo_key, amax, report)
    artifact.attach(copy_, artifact.QuantizedTower(
        family=model, tower=PATH, recipe=recipe,
        fingerprint=fingerprint([calibration_digest] if calibration_digest else [], recipe),
        scales={n[len(prefix):]: s for n, s in scales.items()}, kept=report.kept, source_bytes=source_bytes,
        report=report.to_dict(), dtype=dtype))
    return qcv, report
