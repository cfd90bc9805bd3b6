"""Save FP8 CLIP / Load FP8 CLIP: widgets -> quant.serialize and quant.stock_export."""
from __future__ import annotations

from .ui import progress_bar

FORMATS = ("fp8 + scales (Load FP8 CLIP)", "stock-compatible (weights-only FP8)")
CLIP_TYPES = ("auto", "stable_diffusion", "sdxl", "sd3", "flux", "stable_cascade")
FOLDER = "text_encoders"  # models/text_encoders (ComfyUI also lists models/clip under this name)


def runtime_widget() -> tuple:
    """The `runtime` input of the Load nodes."""
    from ..quant.serialize import LOAD_RUNTIMES

    return (list(LOAD_RUNTIMES), {
        "default": "auto",
        "tooltip": "fp8: FP8 weights in memory, FP8 matmuls with fused kernels where the GPU has them, "
                   "dequantized on the fly elsewhere. fp8-compiled: torch.compile instead of the fused kernels. "
                   "auto: fp8."})


def safetensors_files(folder: str = FOLDER) -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith((".safetensors", ".sft"))]


def full_path(name: str, folder: str = FOLDER, where: str = "models/text_encoders or models/clip") -> str:
    """A listed file name -> its path; names that could leave the models folders are refused first."""
    import folder_paths

    from ..quant.errors import FP8ClipError
    from ..quant.paths import check_name

    check_name(name)  # raises for '..', absolute paths, drives; symlinks ComfyUI lists are followed, as it does
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FP8ClipError(f"{name} is not in {where}. Put the file there and refresh.")
    return path


def files_changed_token(names: list[str], folder: str = FOLDER) -> str:
    """IS_CHANGED of the Load nodes: size and modification time of each selected file, so that a file saved
    again under its name ('overwrite') is loaded again; ComfyUI would keep handing out the old model."""
    import folder_paths

    from ..trt_runtime.watch import file_states

    paths = [folder_paths.get_full_path(folder, n) or f"missing:{n}" for n in names if n and n != "none"]
    return repr(sorted(file_states(paths).items()))


class SaveFP8CLIP:
    NODE_ID = "FP8CLIPSave"
    DISPLAY_NAME = "Save FP8 CLIP"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Saves the FP8 CLIP from 'Quantize CLIP to FP8' into models/text_encoders: FP8 weights with their "
                   "calibrated scales in ComfyUI's quantized layout, the quality report and the recipe in the header. "
                   "Load it with 'Load FP8 CLIP'; stock loaders refuse it with an error instead of loading it wrong. "
                   "'stock-compatible' instead writes weights-only FP8 (no scales) from the ORIGINAL CLIP, which stock "
                   "loaders read correctly, with its measured quality in the header.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "fp8 + scales: the output of 'Quantize CLIP to FP8'. stock-compatible: "
                                         "the original CLIP (from Load CLIP / Load Checkpoint / a LoRA loader)."}),
            "filename": ("STRING", {"default": "fp8/clip_fp8",
                                    "tooltip": "Inside models/text_encoders; sub-folders allowed, no '..'. A CLIP with "
                                               "several towers (SDXL) gets one file per tower: _clip_l, _clip_g."}),
            "format": (list(FORMATS), {"default": FORMATS[0]}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of the same name."}),
        }, "optional": {
            "evaluation_prompts": ("STRING", {
                "multiline": True, "default": "",
                "tooltip": "stock-compatible only: prompts to measure its quality on, one per line. Empty: the 24 "
                           "built-in held-out prompts."}),
        }}

    def save(self, clip, filename, format, overwrite=False, evaluation_prompts=""):
        import folder_paths

        folder = folder_paths.get_folder_paths(FOLDER)[0]
        if format == FORMATS[1]:
            from ..quant.stock_export import export_stock_compatible, quality_text

            from ..quant.prompts import evaluation_prompts as held_out_of

            held_out, note = held_out_of(evaluation_prompts)
            paths, quality = export_stock_compatible(clip, folder, filename, overwrite, held_out=held_out,
                                                     progress=progress_bar())
            text = quality_text(quality) + ("\n" + note if note else "")
        else:
            from ..quant.serialize import save_fp8_clip

            paths = save_fp8_clip(clip, folder, filename, overwrite)
            text = "Load with 'Load FP8 CLIP'."
        text = "Saved " + ", ".join(str(p) for p in paths) + "\n" + text
        return {"ui": {"text": [text]}, "result": (text,)}


class LoadFP8CLIP:
    NODE_ID = "FP8CLIPLoad"
    DISPLAY_NAME = "Load FP8 CLIP"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = ("Loads a CLIP saved by 'Save FP8 CLIP' (from models/text_encoders or models/clip), with FP8 "
                   "weights in memory; its outputs equal the quantized CLIP it was saved from. For SDXL select both "
                   "tower files; for Flux add the stock T5 file as clip_name2, for SD3 as clip_name3.")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "info")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = safetensors_files()
        return {"required": {
            "clip_name": (files, {"tooltip": "A file written by 'Save FP8 CLIP'."}),
            "type": (list(CLIP_TYPES), {"default": "auto",
                                         "tooltip": "auto: the CLIP type the file was saved from."}),
            "runtime": runtime_widget(),
        }, "optional": {
            "clip_name2": (["none", *files], {"default": "none",
                                               "tooltip": "The other tower's file (SDXL), or a stock T5 file."}),
            "clip_name3": (["none", *files], {"default": "none", "tooltip": "SD3: the third file (T5)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name, clip_name2="none", clip_name3="none", **_):
        return files_changed_token([clip_name, clip_name2, clip_name3])

    def load(self, clip_name, type="auto", runtime="auto", clip_name2="none", clip_name3="none"):
        import folder_paths

        from ..quant.serialize import load_fp8_clip, summary_text

        names = [clip_name] + [n for n in (clip_name2, clip_name3) if n and n != "none"]
        clip, files = load_fp8_clip([full_path(n) for n in names], type, runtime,
                                    embedding_directory=folder_paths.get_folder_paths("embeddings"))
        text = "\n".join(f"{f.tower}: {summary_text(f.report)}" for f in files)
        return {"ui": {"text": [text]}, "result": (clip, text)}
