"""The explicit stock-compatible export: weights-only FP8 without scales, which stock loaders read correctly.

Linear weights (and the token embedding) are cast to float8_e4m3fn directly, as ComfyUI's
`--fp8_e4m3fn-text-enc` does in memory; everything else is fp16. Any stock loader reads the file correctly
(FP8 values upcast exactly), at half the size, with no calibration: the quality cost is whatever plain FP8
casting costs for this model, so it is measured on the held-out prompts and written into the header.
"""
from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import artifact, fileformat as ff
from .errors import FP8ClipError
from .fidelity import score, worst
from .patching import clone_with, patched_copy
from .prompts import HELD_OUT_PROMPTS
from .recipe import DEFAULT_KEEP
from .towers import text_family

FP8_MAX = 448.0
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"


def cast_tower(module: torch.nn.Module, tower: str, keep: Sequence[str], fp8_embedding: bool = True
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(file tensors, FP8 keys) for one tower; `module` is changed in place to hold exactly what a stock loader
    will compute with (FP8 values and fp16-rounded values, in the model's own dtype)."""
    linear = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(fnmatch.fnmatchcase(f"{tower}.{n}", p) for p in keep)}
    if fp8_embedding:
        linear.add(TOKEN_EMBEDDING)
    tensors, fp8 = {}, []
    with torch.no_grad():
        for name, p in module.state_dict(keep_vars=True).items():
            if not p.is_floating_point():
                tensors[name] = p.detach().cpu().contiguous()
                continue
            if name in linear:
                stored = p.detach().float().clamp(-FP8_MAX, FP8_MAX).to(ff.FP8)  # saturate: a plain cast gives NaN
                fp8.append(name)
            else:
                stored = p.detach().to(torch.float16)
            p.data = stored.to(p.dtype)
            tensors[name] = stored.cpu().contiguous()
    return tensors, sorted(fp8)


def export_stock_compatible(clip: Any, folder: str | os.PathLike, name: str, overwrite: bool = False,
                            held_out: Sequence[str] = HELD_OUT_PROMPTS, keep: Sequence[str] = DEFAULT_KEEP,
                            progress: Callable[[int, int], None] | None = None, fp8_embedding: bool = True
                            ) -> tuple[list[Path], dict[str, Any]]:
    """Write weights-only FP8 files for the CLIP towers of an original (not yet quantized) CLIP; returns the
    paths and the measured quality (cosine vs `clip` on `held_out`), which is also in each file's header."""
    from safetensors.torch import save_file

    from .calibrate import encode
    from .paths import resolve_in_folder
    from .serialize import bundle_info, tower_file_names, versions

    if artifact.quantized_towers(clip):
        raise FP8ClipError("The stock-compatible export casts the original weights: connect the CLIP from your loader "
                           "(or LoRA loader), not the output of 'Quantize CLIP to FP8'.")
    family, towers = text_family(clip)
    paths = [resolve_in_folder(folder, n) for n in tower_file_names(name, [t.name for t in towers])]
    taken = [p.name for p in paths if p.exists()]
    if taken and not overwrite:
        raise FP8ClipError(f"{', '.join(taken)} already exists in {paths[0].parent}. Choose another file name, or "
                           "set 'overwrite' to replace it.")
    modules = {t.name: patched_copy(clip, t.path) for t in towers}
    payload = {t.name: cast_tower(modules[t.name], t.name, keep, fp8_embedding) for t in towers}
    stock = clone_with(clip, {t.path: modules[t.name] for t in towers})  # computes exactly as stock will
    if not held_out:
        raise FP8ClipError("No prompts to measure the stock-compatible quality on.")
    # All prompts with one CLIP, then with the other: each switch makes ComfyUI re-patch the shared model.
    ref = []
    for i, p in enumerate(held_out):
        ref.append(encode(clip, p))
        if progress:
            progress(i + 1, 2 * len(held_out))
    scores = []
    for i, p in enumerate(held_out):
        scores.append(score(p, ref[i], encode(stock, p)))
        if progress:
            progress(len(held_out) + i + 1, 2 * len(held_out))
    pooled = [s.pooled_cosine for s in scores if s.pooled_cosine is not None]
    quality = {"prompts": len(scores), "cond_min": worst(s.cond_cosine for s in scores),
               "cond_mean": sum(s.cond_cosine for s in scores) / len(scores),
               "pooled_min": worst(pooled),
               "pooled_mean": sum(pooled) / len(pooled) if pooled else None,
               "reference": "the CLIP it was exported from, through ComfyUI's encode path",
               "held_out": "built-in" if tuple(held_out) == tuple(HELD_OUT_PROMPTS) else "custom"}
    if not all(math.isfinite(v) for v in (quality["cond_min"], quality["pooled_min"] or 0.0)):
        # stock loaders would take such a file without a word
        raise FP8ClipError(f"The {family.label} CLIP gives NaN or infinite outputs (before or after the FP8 "
                           "cast); nothing was written. A tower of it may not have been loaded: check the files "
                           "and the CLIP type.")
    bundle = bundle_info(clip, [t.name for t in towers])
    from .paths import write_set
    files = []
    for path, t in zip(paths, towers):
        tensors, fp8 = payload[t.name]
        header = ff.header_strings({ff.H_STOCK: {"quality": quality, "fp8_tensors": len(fp8), "keep": list(keep),
                                                 "family": family.label, "tower": t.name},
                                    ff.H_NOTE: ff.STOCK_NOTE, ff.H_BUNDLE: bundle, ff.H_VERSIONS: versions()})
        files.append((path, lambda tmp, d=tensors, h=header: save_file(d, tmp, metadata=h)))
    return write_set(files, overwrite), quality


def quality_text(quality: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"
    return (f"Stock-compatible weights-only FP8 (no scales): cosine vs the original on {quality['prompts']} held-out "
            f"prompts (min / mean): conditioning {f(quality['cond_min'])} / {f(quality['cond_mean'])}, pooled "
            f"{f(quality['pooled_min'])} / {f(quality['pooled_mean'])}")
