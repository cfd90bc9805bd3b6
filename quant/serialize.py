"""A quantized CLIP <-> files in `fileformat`'s layout: one file per quantized text tower.

Loading builds the CLIP through ComfyUI's own text-encoder loader (`comfy.sd.load_text_encoder_state_dicts`),
fed the file's weights dequantized to fp16 under their standard names. That way ComfyUI itself detects the
model and builds the tokenizer, the cond_stage_model bundle (SD1, SDXL, SD3, Flux...), textual-inversion
support and the ModelPatcher exactly as for the original file, on every host version, instead of this pack
re-implementing its model detection. The FP8 tower is then built with the same code the quantize node uses
(`FP8TextModel.from_quantized`), filled with the file's exact tensors (strict: every name and shape must
match), and swapped into a clone by object patch. Same tensors, same code: the same outputs, bit for bit.
The high-precision copy stays in the base model on the offload device, as it does after quantizing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import artifact, fileformat as ff
from .errors import FP8ClipError
from .fp8_text_model import FP8TextModel
from .modelopt_bridge import LayerScales
from .patching import checkpoint_dtype, clone_with, weight_bytes
from .proxy import refuse_later_weight_patches
from .recipe import Recipe

PACK_DIR = Path(__file__).resolve().parent.parent
LOAD_RUNTIMES = ("auto", "fp8", "fp8-compiled")

# cond_stage_model class (most specific first, as found along its MRO) -> CLIPLoader/DualCLIPLoader type.
BUNDLE_TYPES = {
    "SDXLRefinerClipModel": "stable_diffusion", "SD2ClipModel": "stable_diffusion",
    "StableCascadeClipModel": "stable_cascade", "SDXLClipModel": "sdxl", "SD3ClipModel": "sd3",
    "FluxClipModel": "flux", "HiDreamTEModel": "hidream", "SD1ClipModel": "stable_diffusion",
}


def versions() -> dict[str, str]:
    """Versions that produced a file: the pack, ModelOpt, torch, ComfyUI (for bug reports and cache keys)."""
    from importlib import metadata

    out = {"torch": torch.__version__}
    try:
        import tomllib
        out["comfyui-fp8-clip"] = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())["project"]["version"]
    except Exception:
        out["comfyui-fp8-clip"] = "unknown"
    try:
        out["nvidia-modelopt"] = metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        out["nvidia-modelopt"] = "not installed"
    try:
        import comfyui_version
        out["comfyui"] = comfyui_version.__version__
    except Exception:
        pass
    return out


OTHER_TOWERS = ("t5xxl", "t5xl", "t5base", "umt5xxl", "llama")  # parts of a bundle this pack does not quantize


def bundle_info(clip: Any, towers: Sequence[str]) -> dict[str, Any]:
    csm = clip.cond_stage_model
    names = [c.__name__ for c in type(csm).__mro__]
    cls = next((n for n in names if n in BUNDLE_TYPES), names[0])
    others = [n for n in OTHER_TOWERS if getattr(csm, n, None) is not None]
    return {"class": cls, "towers": list(towers), "others": others, "clip_type": BUNDLE_TYPES.get(cls)}


def tower_file_names(name: str, towers: Sequence[str]) -> list[str]:
    """One tower: `name`; several (SDXL...): `name_clip_l`, `name_clip_g`, as ComfyUI's CLIPSave names them."""
    name = (name or "").strip()  # " name " was saved as "name .safetensors"
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if not stem.strip() or stem.endswith(("/", "\\")):  # "" would become "_clip_l.safetensors"
        raise FP8ClipError("The file name is empty. Enter a name such as 'fp8/sdxl_clip_fp8'.")
    if len(towers) == 1:
        return [stem + ".safetensors"]
    return [f"{stem}_{t}.safetensors" for t in towers]


def summary_text(report: dict[str, Any]) -> str:
    """The quality report of a file in two lines. Values come from the file's header: a field of the wrong type
    (an edited header) shows as '?' rather than failing the Load node."""
    r = ff.ReportFields(report)
    lines = [f"{r.text('family')}, {r.text('scope')}, method '{r.text('method')}'",
             f"cosine vs the unquantized encoder on {r.count('prompts')} held-out prompts (min / mean): "
             f"conditioning {r.number('cond_min')} / {r.number('cond_mean')}, pooled "
             f"{r.number('pooled_min')} / {r.number('pooled_mean')}"]
    return "\n".join(lines + [f"WARNING: {w}" for w in r.warnings()])


# --- saving ------------------------------------------------------------------------------------------------

def set_id(records: Iterable[artifact.QuantizedTower]) -> str:
    """Names the towers of one quantized model: a digest of their calibrated scales, which differ between any
    two models (or calibrations) and are the same when the same model is saved again."""
    h = hashlib.sha256()
    for rec in sorted(records, key=lambda r: r.tower):
        h.update(rec.tower.encode())
        for name, s in sorted(rec.scales.items()):
            h.update(f"{name}:{s.weight_scale!r}:{s.input_scale!r}:{s.input_scale_inv!r}".encode())
    return h.hexdigest()[:16]


def refuse_unsaveable(model: Any, path: str, module: torch.nn.Module, fp8_cls: type, qdq_attr: str, noun: str,
                      engine_node: str) -> None:
    """Refuse a tower whose file would not hold the model that runs: weight patches added after quantizing
    (the file would hold the FP8 weights without them), or a TensorRT engine in place of the FP8 or Q->DQ
    tower (an engine wrapper holds no weights to save)."""
    refuse_later_weight_patches(model.patcher, path)
    if not isinstance(module, fp8_cls) and not hasattr(module, qdq_attr):
        raise FP8ClipError(f"This {noun} runs on a TensorRT engine, which cannot be saved as a model. Save the "
                           f"{noun} that goes into '{engine_node}' (the same FP8 model; the engine is found again "
                           "in the engine cache).")


def fp8_towers(clip: Any) -> dict[str, tuple[FP8TextModel, artifact.QuantizedTower]]:
    """tower name -> (FP8 module, record) for every text tower of `clip` quantized by this pack."""
    found = artifact.quantized_towers(clip) if hasattr(clip, "patcher") else {}
    if not found:
        raise FP8ClipError("This CLIP is not quantized by this pack. Connect the output of 'Quantize CLIP to FP8' "
                           "(or 'Load FP8 CLIP') to save it.")
    out = {}
    for path, (module, rec) in sorted(found.items()):
        if rec.tower not in ff.TEXT_TOWERS:
            raise FP8ClipError(f"This model holds a {rec.tower!r} tower, not a CLIP text encoder: save a CLIP "
                               "vision model with 'Save FP8 CLIP Vision'.")
        refuse_unsaveable(clip, path, module, FP8TextModel, "text_model", "CLIP", "Build TensorRT Engine for FP8 CLIP")
        if not isinstance(module, FP8TextModel):  # fake-quant runtime: the same conversion as the fp8 runtime
            module = FP8TextModel.from_quantized(module, rec.scales, rec.recipe.fp8_embedding, rec.dtype)
        out[rec.tower] = (module, rec)
    return out


def payload(state_dict: dict[str, torch.Tensor], quantized_layers: Sequence[str], rec: artifact.QuantizedTower,
            bundle: dict[str, Any], note: str, report_text: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """File tensors and header of one tower (text or vision): the layout, the record and where it came from."""
    tensors, layout, comfy_meta = ff.pack_tensors(state_dict, quantized_layers)
    header = ff.header_strings({
        ff.FORMAT_KEY: str(ff.FORMAT_VERSION), ff.H_NOTE: note, ff.H_FAMILY: rec.family, ff.H_TOWER: rec.tower,
        ff.H_BUNDLE: bundle, ff.H_RECIPE: rec.recipe.to_json(), ff.H_FINGERPRINT: rec.fingerprint,
        ff.H_KEPT: list(rec.kept), ff.H_REPORT: rec.report, ff.H_REPORT_TEXT: report_text,
        ff.H_VERSIONS: versions(), ff.H_LAYOUT: layout, ff.COMFY_QUANT_HEADER: comfy_meta,
        ff.H_DIGEST: ff.tensor_digest(tensors),
    })
    return tensors, header


def tower_payload(module: torch.nn.Module, rec: artifact.QuantizedTower, bundle: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return payload(module.state_dict(), list(rec.scales), rec, bundle, ff.NOTE, summary_text(rec.report))


def save_fp8_clip(clip: Any, folder: str | os.PathLike, name: str, overwrite: bool = False) -> list[Path]:
    """Write every quantized tower of `clip` into `folder` (atomic; no file is replaced unless `overwrite`)."""
    from safetensors.torch import save_file

    from .paths import resolve_in_folder, write_set

    towers = fp8_towers(clip)
    paths = [resolve_in_folder(folder, n) for n in tower_file_names(name, list(towers))]
    taken = [p.name for p in paths if p.exists()]
    if taken and not overwrite:  # checked for all towers first: never leave half a set written
        raise FP8ClipError(f"{', '.join(taken)} already exists in {paths[0].parent}. Choose another file name, or "
                           "set 'overwrite' to replace it.")
    bundle = bundle_info(clip, list(towers))
    n_files = len(towers) + len(bundle["others"])
    if n_files > 3:  # 'Load FP8 CLIP' has three file slots, as TripleCLIPLoader
        raise FP8ClipError(f"This CLIP is made of {n_files} files ({', '.join([*towers, *bundle['others']])}); "
                           "'Load FP8 CLIP' loads at most 3, so the saved model could not be loaded again. Keep "
                           "the quantize node in the workflow instead of saving.")
    if len(towers) > 1:  # the towers of one save carry one id: files of two saves are never loaded as a pair
        bundle["set"] = set_id(rec for _, rec in towers.values())
    payloads = [tower_payload(module, rec, bundle) for module, rec in towers.values()]  # fail before writing
    return write_set([(path, lambda tmp, t=tensors, h=header: save_file(t, tmp, metadata=h))
                      for path, (tensors, header) in zip(paths, payloads)], overwrite)


# --- loading -----------------------------------------------------------------------------------------------

def dequantized(tf: ff.TowerFile) -> dict[str, torch.Tensor]:
    """The tower's weights in high precision under their standard names: what ComfyUI's loader builds on."""
    sd = {}
    for k, t in tf.tensors.items():
        if k.endswith(ff.SCALE_SUFFIXES):
            continue
        if t.dtype == ff.FP8:
            s = tf.tensors[k[: -len("weight")] + "weight_scale"].float()
            t = (t.float() * (s if s.numel() == 1 else s.reshape(-1, 1))).to(torch.float16)
        sd[k] = t
    return sd


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A stock (not this pack's) text-encoder file for another slot of the bundle (T5 for Flux...)."""
    import comfy.utils

    ff.read_header(path)  # safetensors only, with a clear message when damaged
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if hasattr(comfy.utils, "convert_old_quants"):  # as comfy.sd.load_clip does on hosts that have it
        sd, _ = comfy.utils.convert_old_quants(sd, model_prefix="", metadata=metadata)
    elif metadata and "_quantization_metadata" in metadata:
        sd["_quantization_metadata"] = metadata["_quantization_metadata"]
    return sd


def clip_type_enum(name: str) -> Any:
    """ComfyUI's CLIPType for a type name as Load CLIP / DualCLIPLoader offer it. 'sdxl' has no member of its
    own: DualCLIPLoader builds SDXL's pair as STABLE_DIFFUSION (the two towers make it SDXL), and so does this."""
    import comfy.sd

    enum = getattr(comfy.sd.CLIPType, name.upper(), None)
    if enum is None and name == "sdxl":
        enum = comfy.sd.CLIPType.STABLE_DIFFUSION
    if enum is None:
        known = ", ".join(["sdxl", *(m.name.lower() for m in comfy.sd.CLIPType)])
        raise FP8ClipError(f"Unknown CLIP type {name!r} for this ComfyUI. Use one of: {known}.")
    return enum


def resolve_clip_type(requested: str, files: Sequence[ff.TowerFile]) -> str:
    if requested != "auto":
        return requested
    bundle = files[0].bundle
    return bundle.get("clip_type") or "stable_diffusion"


CLIP_DEPTHS = {12: "clip_l", 32: "clip_g"}  # 24 layers: SD2's CLIP-H, not a tower of these bundles


def stock_kind(keys: Iterable[str]) -> str | None:
    """'clip_l' / 'clip_g' (or 'clip' for another size) for a stock CLIP text tower file, by its tensor names in
    ComfyUI's layout or open_clip's; None for anything else (T5...)."""
    keys = list(keys)
    for prefix in ("text_model.encoder.layers.", "transformer.resblocks."):
        layers = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
        if layers:
            return CLIP_DEPTHS.get(1 + max(int(i) for i in layers if i.isdigit()), "clip")
    return None


def check_bundle(files: Sequence[ff.TowerFile], stock: Sequence[tuple[str, str | None]]) -> None:
    """The selected files must make the CLIP the towers were saved from. ComfyUI builds the CLIP type from the
    files it gets: a lone CLIP-L became SD1.5, and a stray or wrong partner file an SDXL or Flux CLIP with a
    tower never loaded (NaN conditioning, no warning). `stock`: (file name, stock_kind) of the stock files."""
    have = {f.tower for f in files}
    ids = {f.bundle.get("set") for f in files if f.bundle.get("set")}
    # Towers of one save list each other and share its id: an SD1.5 clip_l beside an SDXL (or refiner) clip_g has
    # neither, and ComfyUI would build one SDXL CLIP from two models.
    strangers = len(have) < len(files) or (ids and any(not f.bundle.get("set") for f in files)) or any(
        g.tower not in f.bundle["towers"] for f in files if "towers" in f.bundle for g in files)
    if len(ids) > 1 or strangers:  # e.g. one tower of a set overwritten by another model's save
        raise FP8ClipError(f"The selected {' and '.join(f.tower for f in files)} files come from different saves "
                           "(each 'Save FP8 CLIP' writes the towers of one model together). Select the files "
                           "saved together.")
    for f in files:
        wanted = [t for t in f.bundle.get("towers", []) if t not in have]
        others = f.bundle.get("others", [])
        parts = [f.tower, *(t for t in f.bundle.get("towers", []) if t != f.tower), *others]
        for name, kind in stock:  # a stock CLIP file may stand in for an unquantized partner tower, of its kind
            if kind is not None and kind not in wanted:
                raise FP8ClipError(f"{name} is a stock {kind.replace('_', '-').upper()} text encoder, but the "
                                   f"{f.family} CLIP this {f.tower} file was saved from is {' + '.join(parts)}"
                                   + (f": select its {' and '.join(wanted)} file instead." if wanted else
                                      ". Set that slot to none."))
        if len(stock) > len(wanted) + len(others):
            raise FP8ClipError(f"Too many files: the {f.family} CLIP this {f.tower} file was saved from is "
                               f"{' + '.join(parts)}, and {', '.join(n for n, _ in stock)} would make ComfyUI build "
                               "another CLIP type with towers left empty. Set the extra slot to none.")
        if len(stock) < len(wanted) + len(others):
            what = [f"its {t} file (saved next to it by 'Save FP8 CLIP')" for t in wanted]
            what += [f"the {t} file you use with it (stock, not quantized)" for t in others]
            raise FP8ClipError(f"This file is the {f.tower} tower of a {f.family} CLIP; also select "
                               f"{' and '.join(what)} (in 'Load FP8 CLIP': clip_name2/clip_name3; on the command "
                               "line: another FILE).")


def check_load_runtime(runtime: str) -> None:
    if runtime not in LOAD_RUNTIMES:
        raise FP8ClipError(f"Runtime {runtime!r} cannot run a loaded FP8 model (no original weights in the file). "
                           f"Use one of: {', '.join(LOAD_RUNTIMES)}.")


def record_from_file(tf: ff.TowerFile, scales: dict[str, LayerScales], src: torch.nn.Module
                     ) -> artifact.QuantizedTower:
    """The record a loaded tower carries, as the quantize node attached it: saving it again writes the same
    tensors (a format-1 file gains its stored input_scale_inv and checksum)."""
    return artifact.QuantizedTower(
        family=tf.family, tower=tf.tower, recipe=Recipe.from_json(tf.header[ff.H_RECIPE]),
        fingerprint=tf.header.get(ff.H_FINGERPRINT, ""), scales=scales, kept=list(tf.meta(ff.H_KEPT, [])),
        source_bytes=weight_bytes(src), report=tf.report, dtype=checkpoint_dtype(src))


def load_fp8_clip(paths: Sequence[str | os.PathLike], clip_type: str = "auto", runtime: str = "auto",
                  embedding_directory: Any = None, model_options: dict | None = None) -> tuple[Any, list[ff.TowerFile]]:
    """A CLIP from files saved by `save_fp8_clip` (plus stock files for towers not quantized, e.g. T5)."""
    import comfy.sd

    from .runtime import plan

    check_load_runtime(runtime)
    paths = [Path(p) for p in paths]
    headers = [ff.read_header(p) for p in paths]
    for p, (_, meta) in zip(paths, headers):
        if ff.H_STOCK in meta:
            raise FP8ClipError(f"{p.name} is a stock-compatible export (weights-only FP8): load it with ComfyUI's "
                               "own 'Load CLIP' / 'DualCLIPLoader'.")
    ours = [ff.FORMAT_KEY in meta for _, meta in headers]
    if not any(ours):
        ff.read_tower_file(paths[0])  # says what the first file is instead, and which file to pick
        raise FP8ClipError("None of the selected files was saved by 'Save FP8 CLIP'.")
    # In any slot, as ComfyUI's loaders take them (towers go by their weights). Stock files are told apart by
    # their headers, so a wrong one is refused before its tensors (a T5-XXL: 9.5 GB) are read.
    read = [ff.read_tower_file(p) if mine else None for p, mine in zip(paths, ours)]
    files = [tf for tf in read if tf is not None]
    stock = [(p.name, stock_kind(entries)) for p, (entries, _), mine in zip(paths, headers, ours) if not mine]
    if len({f.tower for f in files}) != len(files):
        raise FP8ClipError("Two of the selected files hold the same tower "
                           f"({', '.join(f.tower for f in files)}); select the files of different towers.")
    check_bundle(files, stock)
    state_dicts = [read_state_dict(p) if tf is None else dequantized(tf) for p, tf in zip(paths, read)]
    ctype = resolve_clip_type(clip_type, files)
    clip = comfy.sd.load_text_encoder_state_dicts(state_dicts, embedding_directory=embedding_directory,
                                                  clip_type=clip_type_enum(ctype),
                                                  model_options=dict(model_options or {}))
    device = torch.device(clip.patcher.load_device)
    plan(runtime, device)  # a device that cannot run it: say so now, not at the first encode
    swaps, size = {}, clip.patcher.model_size()
    for tf in files:
        fp8, rec = build_tower(clip, tf, ctype)
        fp8.configure(lambda d, requested=runtime: plan(requested, d))
        fp8.load_device = device
        size += weight_bytes(fp8) - rec.source_bytes
        swaps[f"{tf.tower}.transformer"] = fp8
    out = clone_with(clip, swaps)
    out.patcher.size = size  # what ComfyUI's memory management budgets for this clone
    return out, files


def fill_exactly(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load a file's tensors into the FP8 tower: every name and shape must match, none may be left over."""
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise FP8ClipError(f"{what} does not match the model ComfyUI detected for it: {e}") from None
    # Format 1 files lack input_scale_inv; the layers derived it from input_scale (unpack_tensors checks format 2).
    missing = [k for k in missing if not k.endswith(".input_scale_inv")]
    if missing or unexpected:
        raise FP8ClipError(f"{what} does not match the model ComfyUI detected for it (missing: {missing[:3]}, "
                           f"unexpected: {unexpected[:3]}); the file is damaged or from another model.")


def build_tower(clip: Any, tf: ff.TowerFile, ctype: str) -> tuple[FP8TextModel, artifact.QuantizedTower]:
    tower = getattr(clip.cond_stage_model, tf.tower, None)
    src = getattr(tower, "transformer", None)
    if src is None or not hasattr(src, "text_model"):
        raise FP8ClipError(f"The file holds a {tf.tower} tower, but a '{ctype}' CLIP has none. Pick the type it was "
                           f"saved from ({tf.bundle.get('clip_type') or 'auto'}).")
    scales = {k: LayerScales(*s) for k, s in tf.quantized.items()}
    rec = record_from_file(tf, scales, src)
    fp8 = FP8TextModel.from_quantized(src, scales, tf.fp8_embedding, rec.dtype)
    fill_exactly(fp8, tf.tensors, f"The {tf.tower} file")
    artifact.attach(fp8, rec)
    return fp8, rec
