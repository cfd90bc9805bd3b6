"""Command line: the nodes' code without the UI, for servers and scripts that convert models ahead of time.

    python -m fp8clip quantize IN.safetensors OUT.safetensors [--prompts FILE] [--keep PATTERN ...]
    python -m fp8clip info FILE.safetensors
    python -m fp8clip build-engine FILE... [--vision] [--max-rows N] [--portable]

(`python -m fp8clip` from the pack folder, or `python path/to/comfyui-fp8-clip ...` from anywhere.)
ComfyUI's modules are imported in this process (no server, no UI); the ComfyUI folder comes from --comfyui,
else COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

PACK_DIR = Path(__file__).resolve().parent


class CLIError(Exception):
    pass


def find_comfyui(explicit: str | None) -> Path:
    candidates = [(explicit, "--comfyui"), (os.environ.get("COMFYUI_PATH"), "COMFYUI_PATH")]
    for value, source in candidates:
        if value:
            d = Path(value).expanduser().resolve()
            if not (d / "comfy" / "sd.py").is_file():
                raise CLIError(f"{source}={value} is not a ComfyUI folder (no comfy/sd.py in it).")
            return d
    # As the pack sits in custom_nodes/: a symlinked pack (a developer's install) resolves elsewhere
    for pack in (Path(__file__).absolute().parent, PACK_DIR):
        if pack.parent.name == "custom_nodes" and (pack.parent.parent / "comfy" / "sd.py").is_file():
            return pack.parent.parent
    raise CLIError("Where is ComfyUI? Pass --comfyui PATH or set COMFYUI_PATH (this pack is not inside a "
                   "ComfyUI custom_nodes folder).")


def boot_comfyui(comfy_dir: Path, cpu: bool, comfy_args: list[str] = ()) -> None:
    """Import ComfyUI's model code in this process with its own argument defaults (plus --cpu, also when no
    GPU is visible: ComfyUI would stop at start-up otherwise) and its model folders as its main.py sets them:
    `comfy_args` (--base-directory, --extra-model-paths-config) and the extra_model_paths.yaml beside main.py."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    cpu = cpu or not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
    sys.path.insert(0, str(comfy_dir))
    sys.argv = ["main.py", *(["--cpu"] if cpu else []), *comfy_args]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv)
    import comfy.sd  # noqa: F401

    _apply_model_paths(comfy_dir, comfy.cli_args.args)


def _apply_model_paths(comfy_dir: Path, args: argparse.Namespace) -> None:
    """What ComfyUI's main.py does before it loads custom nodes: without it, the engine cache of `build-engine`
    was models/tensorrt under the ComfyUI folder while the node's was the one extra_model_paths.yaml names."""
    import importlib.util

    beside = comfy_dir / "extra_model_paths.yaml"
    configs = [beside] if beside.is_file() else []
    for group in getattr(args, "extra_model_paths_config", None) or []:
        configs += [Path(c) for c in group]
    if not configs:
        return
    # Loaded from its file: `utils` may name another module in this process.
    spec = importlib.util.spec_from_file_location("fp8clip_comfy_extra_config",
                                                  comfy_dir / "utils" / "extra_config.py")
    extra = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra)
    for c in configs:
        if not c.is_file():
            raise CLIError(f"{c}: no such extra model paths file.")
        extra.load_extra_path_config(str(c))


def progress_printer(label: str, unit: str = "prompt") -> Callable[[int, int], None]:
    """A progress bar on stderr; a count that starts over (the next tower's engine) starts a new bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    state: dict = {}

    def update(done: int, total: int) -> None:
        if tqdm is not None:
            bar = state.get("bar")
            if bar is None and state.get("finished") and done >= total:
                return  # the same count reported complete twice
            state["finished"] = False
            if bar is None or done < bar.n or bar.total != total:
                if bar is not None:
                    bar.close()
                bar = state["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
                state["bar"], state["finished"] = None, True
        else:
            print(f"\r{label}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    return update


def prompts_from(path: str | None, option: str) -> list[str] | None:
    """The prompts of a file given with `option`, None without one; a file with none in it is an error."""
    lines = read_lines(path)
    if lines is not None and not lines:
        raise CLIError(f"{path} ({option}): no prompt in it, only blank or # lines. Add prompts, one per line, or "
                       f"leave out {option} for the built-in ones.")
    return lines


def check_text_encoder_input(p: Path) -> str | None:
    """The stock CLIP kind of an input file (None: another text encoder, such as T5); refuses what is not one."""
    from .quant.fileformat import H_STOCK, H_TOWER, read_header
    from .quant.serialize import stock_kind

    if p.is_dir():
        raise CLIError(f"{p} is a folder: give the text encoder's .safetensors file.")
    if not p.is_file():
        raise CLIError(f"{p}: no such file.")
    entries, meta = read_header(p)  # safetensors only: never unpickle; clear message for damaged files
    if H_TOWER in meta or H_STOCK in meta:
        raise CLIError(f"{p} is already an FP8 file of this pack: quantize the original text encoder instead.")
    kind = stock_kind(entries)
    if kind is None and any(k.startswith(("vision_model.", "visual.")) or ".vision_model." in k for k in entries):
        raise CLIError(f"{p} is a CLIP vision model: the command line quantizes text encoders; use the "
                       "'Quantize CLIP Vision to FP8' node for it.")
    return kind


def check_writable_folder(folder: Path) -> None:
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CLIError(f"{folder}: cannot write there ({e.strerror or e}). Choose another output path.") from None


def read_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from .quant.prompts import parse_prompts

    try:
        return parse_prompts(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{path}: cannot read the prompts ({e}); give a UTF-8 text file, one prompt per line.") from None


def output_paths(out: Path, towers: list[str]) -> list[Path]:
    from .quant.serialize import tower_file_names

    return [out.parent / n for n in tower_file_names(out.name, towers)]


def check_outputs(out: Path, towers: list[str], inputs: list[Path], overwrite: bool) -> None:
    """What the save would refuse, refused before the minutes of calibration (the save checks again)."""
    from .quant.paths import resolve_in_folder

    sources = {p.resolve() for p in inputs}
    for p in output_paths(out, towers):
        path = resolve_in_folder(out.parent, p.name)  # names Windows cannot store, links out of the folder...
        if path in sources:
            raise CLIError(f"{p} is an input of this command: writing it would replace the original encoder. "
                           "Choose another output name.")
        if path.is_dir():
            raise CLIError(f"{p} is a folder: choose another output name.")
        if path.exists() and not overwrite:
            raise CLIError(f"{p} exists; pass --overwrite to replace it.")


def check_towers_loaded(clip, inputs: list[Path], kinds: list[str | None], ctype: str) -> None:
    """ComfyUI builds the CLIP --type names and fills what the files hold: a tower in none of them stays
    uninitialized (NaN or zero conditioning, and a stock-compatible file of garbage that loaders accept)."""
    from .quant.towers import TOWER_LABELS, text_family

    family, towers = text_family(clip)
    unknown = kinds.count("clip")  # a CLIP tower of another size (SD2's CLIP-H): cannot say which slot it fills
    missing = [t.name for t in towers if t.name not in kinds]
    if len(missing) > unknown:
        held = ", ".join(f"{p.name}: {TOWER_LABELS.get(k, 'a CLIP') if k else 'not a CLIP'}"
                         for p, k in zip(inputs, kinds))
        raise CLIError(f"--type {ctype} with these files makes a {family.label} CLIP whose "
                       f"{' and '.join(missing)} is in none of them ({held}). Give the files that CLIP type takes, "
                       "or the --type they make (as DualCLIPLoader's type).")


def cmd_quantize(a: argparse.Namespace) -> int:
    boot_comfyui(find_comfyui(a.comfyui), a.cpu, comfy_args(a))
    import comfy.sd
    import folder_paths

    from .quant.prompts import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS
    from .quant.recipe import DEFAULT_KEEP, SCOPES, Recipe
    from .quant.serialize import clip_type_enum
    from .quant.towers import text_family

    inputs = [Path(a.input), *([Path(a.input2)] if a.input2 else [])]
    kinds = [check_text_encoder_input(p) for p in inputs]
    if not any(kinds):
        raise CLIError(f"{', '.join(map(str, inputs))}: no CLIP text encoder in it (CLIP-L, CLIP-G...). Give a "
                       "text-encoder file, as Load CLIP takes (models/text_encoders); a checkpoint's CLIP is "
                       "quantized by the node, after Load Checkpoint.")
    if a.input2 and a.type is None:  # stable_diffusion + two files: ComfyUI builds SDXL, a tower left unloaded
        raise CLIError("Two text-encoder files: give the CLIP they make with --type (sdxl, flux, sd3...), as "
                       "DualCLIPLoader's type.")
    calibration_only = [o for o, v in (("--prompts", a.prompts), ("--method", a.method), ("--scope", a.scope),
                                       ("--min-cosine", a.min_cosine)) if v is not None]
    if a.format == "stock-compatible" and calibration_only:
        raise CLIError(f"{', '.join(calibration_only)}: the stock-compatible format casts the weights without "
                       "calibrating; leave these out, or use the default format (fp8clip).")
    if a.scope == "weights only" and a.prompts is not None:
        raise CLIError("--prompts: not used with --scope 'weights only', whose scales come from the weights; leave "
                       "it out.")
    min_cosine = 0.99 if a.min_cosine is None else a.min_cosine
    if not 0.0 <= min_cosine <= 1.0:
        raise CLIError(f"--min-cosine {a.min_cosine}: give a cosine from 0 to 1 (default 0.99).")
    out = Path(a.output)
    if out.suffix.lower() != ".safetensors":
        raise CLIError(f"{out}: the output must be a .safetensors file.")
    check_writable_folder(out.parent)  # before the minutes of calibration
    ctype = clip_type_enum(a.type or "stable_diffusion")
    # read before the work: a missing file fails now; a file of only # lines is an error, as in the node
    prompts = [] if a.scope == "weights only" else prompts_from(a.prompts, "--prompts") or list(CALIBRATION_PROMPTS)
    held_out = prompts_from(a.eval_prompts, "--eval-prompts") or list(HELD_OUT_PROMPTS)
    t0 = time.perf_counter()
    try:
        clip = comfy.sd.load_clip(ckpt_paths=[str(p) for p in inputs],
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"), clip_type=ctype)
    except Exception as e:  # noqa: BLE001 - size mismatches, a bundle class missing its slot: files that do
        # not make a CLIP of this type together
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = next((ln.strip() for ln in lines if "size mismatch" in ln or "Missing key" in ln), lines[0])
        raise CLIError(f"ComfyUI could not build a {ctype.name.lower()} CLIP from {', '.join(p.name for p in inputs)}"
                       f" ({type(e).__name__}: {detail}). Check --type and the files.") from None
    print(f"Loaded {', '.join(p.name for p in inputs)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    check_towers_loaded(clip, inputs, kinds, ctype.name.lower())
    _, towers = text_family(clip)
    check_outputs(out, [t.name for t in towers], inputs, a.overwrite)
    import torch

    warned = False
    if a.format == "stock-compatible":
        from .quant.stock_export import export_stock_compatible, quality_text

        with torch.inference_mode():
            paths, quality = export_stock_compatible(clip, out.parent, out.name, a.overwrite, held_out=held_out,
                                                     keep=tuple(a.keep) if a.keep is not None else DEFAULT_KEEP,
                                                     fp8_embedding=not a.no_fp8_embedding,
                                                     progress=progress_printer("measuring"))
        print(quality_text(quality))
    else:
        from .quant.calibrate import quantize_clip
        from .quant.serialize import save_fp8_clip

        recipe = Recipe(keep=tuple(a.keep) if a.keep is not None else DEFAULT_KEEP, method=a.method or "max",
                        scope=a.scope or SCOPES[0], fp8_embedding=not a.no_fp8_embedding)
        with torch.inference_mode():
            qclip, report = quantize_clip(clip, prompts, recipe, held_out=held_out, min_cosine=min_cosine,
                                          progress=progress_printer("calibrating + evaluating"))
            paths = save_fp8_clip(qclip, out.parent, out.name, a.overwrite)
        print(report.text())
        warned = report.below_threshold
    for p in paths:
        print(f"Saved {p} ({p.stat().st_size / 2**20:.0f} MiB)")
    return 1 if warned else 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .quant import fileformat as ff

    entries, meta = ff.read_header(Path(a.file))
    if ff.H_STOCK in meta:
        from .quant.stock_export import quality_text
        try:
            text = quality_text(json.loads(meta[ff.H_STOCK])["quality"])
        except (ValueError, TypeError, KeyError):
            raise CLIError(f"{a.file}: its stock-compatible header is damaged (no quality record). Export the "
                           "model again to get the report.") from None
        print(text)
        return 0
    ff.check_header(Path(a.file).name, entries, meta, ff.KNOWN_TOWERS)
    for k in (ff.H_FAMILY, ff.H_TOWER, ff.H_FINGERPRINT, ff.H_KEPT, ff.H_RECIPE, ff.H_VERSIONS):
        print(f"{k.split('.', 1)[1]}: {meta.get(k, '')}")
    print(meta.get(ff.H_REPORT_TEXT, ""))
    return 0


def cmd_build_engine(a: argparse.Namespace, rest: list[str]) -> int:
    from .trt_runtime.cli import main as build_main

    return build_main(rest, comfyui=a.comfyui, cpu=a.cpu, comfy_args=comfy_args(a))


def comfy_args(a: argparse.Namespace) -> list[str]:
    """The options this CLI passes on to ComfyUI's own argument parser."""
    out = ["--base-directory", a.base_directory] if a.base_directory else []
    for path in a.extra_model_paths_config or []:
        out += ["--extra-model-paths-config", path]
    return out


def add_common_options(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--comfyui", default=default,
                   help="ComfyUI folder (default: COMFYUI_PATH, else the ComfyUI holding this pack)")
    p.add_argument("--cpu", action="store_true", default=default or False,
                   help="run on the CPU even if a GPU is present")
    p.add_argument("--base-directory", metavar="PATH", default=default,
                   help="as ComfyUI's option (ComfyUI Desktop sets it)")
    p.add_argument("--extra-model-paths-config", metavar="PATH", action="append", default=default,
                   help="as ComfyUI's option, one file each time (extra_model_paths.yaml beside main.py is "
                        "read anyway)")


def common_parser() -> argparse.ArgumentParser:
    """The options every command takes after its name too; unset ones are left out of the result."""
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, argparse.SUPPRESS)
    return common


def parser() -> argparse.ArgumentParser:
    from .quant.recipe import METHODS, SCOPES

    ap = argparse.ArgumentParser(prog="python -m fp8clip", description="Calibrated FP8 CLIP text encoders for "
                                 "ComfyUI, without the UI.")
    add_common_options(ap, None)
    common = common_parser()  # accepted before or after the command
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", parents=[common],
                       help="calibrate a CLIP file to FP8 and save it with its quality report")
    q.add_argument("input", help="CLIP text-encoder .safetensors (clip_l, clip_g...)")
    q.add_argument("output", help="output .safetensors (several towers: _clip_l/_clip_g are appended)")
    q.add_argument("--input2", help="second text-encoder file (SDXL clip_g, Flux t5xxl), as DualCLIPLoader takes")
    q.add_argument("--type", default=None, help="CLIP type as in Load CLIP (stable_diffusion, sdxl, sd3, flux...); "
                                               "default stable_diffusion for one file, required with --input2")
    q.add_argument("--prompts", help="calibration prompts, one per line (default: the 64 built-in; not used with "
                                     "--scope 'weights only')")
    q.add_argument("--eval-prompts", help="held-out prompts for the report (default: the 24 built-in)")
    q.add_argument("--keep", nargs="*", metavar="PATTERN", help="layers kept in high precision (default: "
                                                                "*text_projection)")
    q.add_argument("--method", choices=METHODS, default=None, help="calibration method (default: max)")
    q.add_argument("--scope", choices=SCOPES, default=None, help=f"what is quantized (default: {SCOPES[0]})")
    q.add_argument("--no-fp8-embedding", action="store_true", help="keep the token embedding in fp16")
    q.add_argument("--min-cosine", type=float, default=None,
                   help="the report warns below this worst held-out cosine, and the command then exits with "
                        "status 1 (the file is saved; default 0.99)")
    q.add_argument("--format", choices=("fp8clip", "stock-compatible"), default="fp8clip",
                   help="fp8clip: calibrated FP8 + scales for 'Load FP8 CLIP'; stock-compatible: weights-only FP8 "
                        "that stock loaders read")
    q.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", parents=[common], help="print what a saved FP8 CLIP file holds")
    i.add_argument("file")
    sub.add_parser("build-engine", help="build a TensorRT engine (needs the TensorRT runtime of the pack)",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    ap = parser()
    from .quant.errors import FP8ClipError

    try:
        if "build-engine" in argv:
            k = argv.index("build-engine")
            a = ap.parse_args(argv[: k + 1])
            after, rest = common_parser().parse_known_args(argv[k + 1:])  # accepted after the command too
            for name, value in vars(after).items():
                if name == "extra_model_paths_config":
                    value = (a.extra_model_paths_config or []) + value
                setattr(a, name, value)
            return cmd_build_engine(a, rest)
        a = ap.parse_args(argv)
        return {"quantize": cmd_quantize, "info": cmd_info}[a.command](a)
    except (CLIError, FP8ClipError, OSError) as e:  # OSError: a file or folder given cannot be read or written
        print(f"error: {e}", file=sys.stderr)
        return 2
