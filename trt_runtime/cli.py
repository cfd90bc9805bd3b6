"""`python -m fp8clip build-engine FILE...`: the TensorRT node's export/build/cache, ahead of time.

Builds into the same cache (ComfyUI's models/tensorrt, or --cache) under the same key the node computes, so
the node finds the engine with no build when the profile, activations and target GPU match.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


MAX_ROWS = 64  # the nodes' max_batch_rows / max_images: a larger engine could never be looked up


def rows_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1 to {MAX_ROWS} (the largest "
                                         "max_batch_rows / max_images the node takes)")
    return n


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fp8clip build-engine",
                                 description="Build TensorRT engines for FP8 CLIP files saved by this pack.")
    ap.add_argument("files", nargs="+", help="FP8 CLIP file(s) from 'Save FP8 CLIP' or `quantize` (SDXL: both "
                                             "towers), or one FP8 CLIP vision file")
    ap.add_argument("--vision", action="store_true", help="the file is a CLIP vision model (models/clip_vision)")
    ap.add_argument("--type", default="auto", help="CLIP type as in Load CLIP (default: from the file)")
    ap.add_argument("--max-rows", type=rows_arg, default=None,
                    help="largest batch: rows of 77 tokens (text, default 8) or images (vision, default 4); the "
                         "node's max_batch_rows / max_images must match to find the engine")
    ap.add_argument("--activations", choices=("float32", "float16"), default="float32")
    ap.add_argument("--cache", help="engine folder (default: models/tensorrt of the ComfyUI in use)")
    ap.add_argument("--portable", action="store_true",
                    help="TensorRT for RTX only: build a portable engine without a GPU (checks export and build; "
                         "the node builds for its own GPU)")
    return ap


def main(argv: list[str] | None = None, *, comfyui: str | None = None, cpu: bool = False,
         comfy_args: list[str] = ()) -> int:
    from ..cli import CLIError, boot_comfyui, find_comfyui, progress_printer

    a = parser().parse_args(argv)
    boot_comfyui(find_comfyui(comfyui), cpu, comfy_args)
    import comfy.model_management
    import folder_paths
    import torch

    from ..quant.serialize import load_fp8_clip
    from ..quant.serialize_vision import load_fp8_clip_vision
    from .availability import build_only_support, engine_support
    from .cache import EngineCache, register_folder
    from .pipeline import prebuild

    for f in a.files:
        if not Path(f).is_file():
            raise CLIError(f"{f}: no such file.")
    if a.vision and len(a.files) != 1:
        raise CLIError("A CLIP vision model is one file; give exactly one with --vision.")
    from ..quant import fileformat as ff
    for f in a.files:  # the flag, not the loader nodes, is what a command-line user can change
        tower = ff.read_header(Path(f))[1].get(ff.H_TOWER)
        if tower in ff.VISION_TOWERS and not a.vision:
            raise CLIError(f"{f} is an FP8 CLIP vision file: add --vision.")
        if tower in ff.TEXT_TOWERS and a.vision:
            raise CLIError(f"{f} is an FP8 CLIP text-encoder file ({tower}): leave out --vision.")
    support = build_only_support() if a.portable else engine_support(comfy.model_management.get_torch_device())
    if not support.ok:
        raise CLIError(f"No engine can be built here: {support.reason}"
                       + ("" if a.portable else " (--portable builds a TensorRT for RTX engine without a GPU)"))
    cache = Path(a.cache) if a.cache else Path(register_folder(folder_paths)[0])
    EngineCache(cache).check_writable()  # before minutes of building, not after
    print(f"engine cache: {cache}", file=sys.stderr)
    rows = a.max_rows if a.max_rows is not None else (4 if a.vision else 8)
    with torch.inference_mode():
        if a.vision:
            model, _ = load_fp8_clip_vision(a.files[0], "fp8")
        else:
            model, _ = load_fp8_clip(a.files, a.type, "fp8")
        bar = progress_printer("building", unit="%")
        lines = prebuild(model, a.vision, rows, support, cache_root=cache, activations=a.activations,
                         progress=lambda f, phase: bar(int(f * 100), 100))
    print(f"TensorRT engine: {support.reason}")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
