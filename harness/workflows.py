"""Builds the UI-format example workflows in example_workflows/ (run: python -m harness.workflows).

UI format (nodes, links, positional widgets_values) is what users drag into ComfyUI and share; writing it
from one builder keeps widget order and link types consistent with the nodes' INPUT_TYPES.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from quant.prompts import DEFAULT_CALIBRATION_TEXT

OUT = Path(__file__).resolve().parent.parent / "example_workflows"


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos: tuple[int, int], widgets: list, inputs: list[tuple[str, str]] = (),
             outputs: list[tuple[str, str]] = (), size: tuple[int, int] = (320, 120), title: str | None = None
             ) -> int:
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
             "mode": 0, "inputs": [{"name": a, "type": t, "link": None} for a, t in inputs],
             "outputs": [{"name": a, "type": t, "links": [], "slot_index": i} for i, (a, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return nid

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        t = s["outputs"][src_slot]["type"]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid
        self.links.append([lid, src, src_slot, dst, slot, t])

    def to_json(self, note: str) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"fp8clip_note": note}, "version": 0.4}


QUANTIZE_WIDGETS = [DEFAULT_CALIBRATION_TEXT, "*text_projection", "max", "weights+activations", 0.99, "auto", True,
                    ""]  # evaluation_prompts: empty = the built-in held-out set


def sd15_txt2img() -> dict:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (40, 200), ["v1-5-pruned-emaonly.safetensors"],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    q = g.node("FP8CLIPQuantize", (400, 60), QUANTIZE_WIDGETS, inputs=[("clip", "CLIP")],
               outputs=[("clip", "CLIP"), ("report", "STRING")], size=(420, 420))
    pos = g.node("CLIPTextEncode", (880, 40), ["a watercolor painting of a lighthouse on a cliff at sunrise, "
                                               "soft light, seagulls"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 160),
                 title="Positive prompt")
    neg = g.node("CLIPTextEncode", (880, 240), ["blurry, low quality, watermark, text"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 120),
                 title="Negative prompt")
    lat = g.node("EmptyLatentImage", (880, 400), [512, 512, 1], outputs=[("LATENT", "LATENT")])
    ks = g.node("KSampler", (1320, 60), [42, "fixed", 20, 7.0, "euler", "normal", 1.0],
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 260))
    dec = g.node("VAEDecode", (1680, 60), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 60))
    save = g.node("SaveImage", (1940, 60), ["fp8clip"], inputs=[("images", "IMAGE")], size=(400, 420))
    rep = g.node("PreviewAny", (400, 520), [], inputs=[("source", "*")], size=(420, 260),
                 title="FP8 CLIP quality report")
    g.link(ckpt, 1, q, "clip")
    g.link(q, 0, pos, "clip")
    g.link(q, 0, neg, "clip")
    g.link(ckpt, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    g.link(q, 1, rep, "source")
    return g.to_json("SD1.5 text-to-image with the CLIP calibrated and quantized to FP8 in the graph. "
                     "Select your SD1.5 checkpoint in Load Checkpoint.")


def sdxl_txt2img() -> dict:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (40, 200), ["sd_xl_base_1.0.safetensors"],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    q = g.node("FP8CLIPQuantize", (400, 60), QUANTIZE_WIDGETS, inputs=[("clip", "CLIP")],
               outputs=[("clip", "CLIP"), ("report", "STRING")], size=(420, 420))
    pos = g.node("CLIPTextEncode", (880, 40), ["a cinematic photo of a red fox in a snowy birch forest, golden "
                                               "hour, shallow depth of field"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 160),
                 title="Positive prompt")
    neg = g.node("CLIPTextEncode", (880, 240), ["lowres, blurry, watermark, text"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 120),
                 title="Negative prompt")
    lat = g.node("EmptyLatentImage", (880, 400), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    ks = g.node("KSampler", (1320, 60), [7, "fixed", 25, 6.5, "dpmpp_2m", "karras", 1.0],
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 260))
    dec = g.node("VAEDecode", (1680, 60), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 60))
    save = g.node("SaveImage", (1940, 60), ["fp8clip_sdxl"], inputs=[("images", "IMAGE")], size=(400, 420))
    rep = g.node("PreviewAny", (400, 520), [], inputs=[("source", "*")], size=(420, 300),
                 title="FP8 CLIP quality report (CLIP-L and CLIP-G)")
    for a, b in (((ckpt, 1), (q, "clip")), ((q, 0), (pos, "clip")), ((q, 0), (neg, "clip")),
                 ((ckpt, 0), (ks, "model")), ((pos, 0), (ks, "positive")), ((neg, 0), (ks, "negative")),
                 ((lat, 0), (ks, "latent_image")), ((ks, 0), (dec, "samples")), ((ckpt, 2), (dec, "vae")),
                 ((dec, 0), (save, "images")), ((q, 1), (rep, "source"))):
        g.link(a[0], a[1], b[0], b[1])
    return g.to_json("SDXL text-to-image with both CLIP towers (CLIP-L and CLIP-G) calibrated and quantized to "
                     "FP8 in the graph. Select your SDXL checkpoint in Load Checkpoint.")


def unclip_image_variation() -> dict:
    g = Graph()
    ckpt = g.node("unCLIPCheckpointLoader", (40, 200), ["sd21-unclip-h.ckpt"],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"), ("CLIP_VISION", "CLIP_VISION")],
                  size=(320, 120))
    img = g.node("LoadImage", (40, 380), ["example.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                 size=(320, 320))
    qv = g.node("FP8CLIPVisionQuantize", (400, 40), ["*patch_embedding*", "max", "weights+activations", 0.99, "auto"],
                inputs=[("clip_vision", "CLIP_VISION"), ("images", "IMAGE"), ("evaluation_images", "IMAGE")],
                outputs=[("clip_vision", "CLIP_VISION"), ("report", "STRING")], size=(400, 260))
    enc = g.node("CLIPVisionEncode", (860, 40), ["center"], inputs=[("clip_vision", "CLIP_VISION"),
                                                                     ("image", "IMAGE")],
                 outputs=[("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], size=(300, 80))
    pos = g.node("CLIPTextEncode", (860, 180), ["a high quality photo"], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(300, 120), title="Positive prompt")
    neg = g.node("CLIPTextEncode", (860, 340), ["blurry, low quality"], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(300, 120), title="Negative prompt")
    un = g.node("unCLIPConditioning", (1200, 40), [1.0, 0.0],
                inputs=[("conditioning", "CONDITIONING"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                outputs=[("CONDITIONING", "CONDITIONING")], size=(300, 100))
    lat = g.node("EmptyLatentImage", (1200, 200), [768, 768, 1], outputs=[("LATENT", "LATENT")])
    ks = g.node("KSampler", (1540, 40), [1, "fixed", 20, 7.0, "euler", "normal", 1.0],
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 260))
    dec = g.node("VAEDecode", (1900, 40), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 60))
    save = g.node("SaveImage", (2160, 40), ["fp8clip_unclip"], inputs=[("images", "IMAGE")], size=(400, 420))
    rep = g.node("PreviewAny", (400, 340), [], inputs=[("source", "*")], size=(400, 260),
                 title="FP8 CLIP vision quality report")
    for a, b in (((ckpt, 3), (qv, "clip_vision")), ((img, 0), (qv, "images")), ((qv, 0), (enc, "clip_vision")),
                 ((img, 0), (enc, "image")), ((ckpt, 1), (pos, "clip")), ((ckpt, 1), (neg, "clip")),
                 ((pos, 0), (un, "conditioning")), ((enc, 0), (un, "clip_vision_output")),
                 ((ckpt, 0), (ks, "model")), ((un, 0), (ks, "positive")), ((neg, 0), (ks, "negative")),
                 ((lat, 0), (ks, "latent_image")), ((ks, 0), (dec, "samples")), ((ckpt, 2), (dec, "vae")),
                 ((dec, 0), (save, "images")), ((qv, 1), (rep, "source"))):
        g.link(a[0], a[1], b[0], b[1])
    return g.to_json("Image variations with SD2.1 unCLIP: the CLIP vision (ViT-H/14) image encoder calibrated "
                     "on your input image and quantized to FP8. Select an unCLIP checkpoint and an image.")


def widget_names(input_types: dict) -> list[str]:
    """Inputs shown as widgets, in the order a UI workflow's widgets_values stores them.

    The UI adds a value after a seed (control_after_generate) and after an image-upload combo.
    """
    out = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            t, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append(name)
                if opts.get("image_upload"):
                    out.append("upload")
                if t == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                    out.append("control_after_generate")
    return out


def to_api(workflow: dict, input_types: Callable[[str], dict]) -> dict:
    """A UI workflow as the API prompt ComfyUI's queue runs: what the browser sends when you press Queue.

    `input_types(class_type)` gives the node's {"required": ..., "optional": ...} (INPUT_TYPES() or
    /object_info's "input").
    """
    links = {lid: (str(src), slot) for lid, src, slot, _dst, _dslot, _t in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) != 0:  # muted or bypassed
            continue
        names = widget_names(input_types(n["type"]))
        inputs = {k: v for k, v in zip(names, n["widgets_values"]) if k not in ("upload", "control_after_generate")}
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                src, slot = links[inp["link"]]
                inputs[inp["name"]] = [src, slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def bypass(prompt: dict, node_id: str, through: str) -> dict:
    """A copy of `prompt` without node `node_id`: what used its first output takes the node's input `through`
    (as ComfyUI's Bypass does); nodes that read its other outputs (the report) go too."""
    out = json.loads(json.dumps(prompt))
    source = out.pop(node_id)["inputs"][through]
    for k, n in list(out.items()):
        for name, v in n["inputs"].items():
            if isinstance(v, list) and v[0] == node_id:
                if v[1] != 0:
                    del out[k]
                    break
                n["inputs"][name] = source
    return out


def saved_image(base: Path, outputs: dict, node: str):
    """The first image a SaveImage node `node` wrote under ComfyUI's base directory, as float64 HxWx3."""
    import numpy as np
    from PIL import Image

    img = outputs[node]["images"][0]
    return np.asarray(Image.open(base / "output" / img["subfolder"] / img["filename"]), dtype=np.float64)


def psnr(a, b) -> float:
    """PSNR in dB between two 8-bit images (inf when identical)."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


WORKFLOWS = {"sd15_fp8_clip_txt2img.json": sd15_txt2img, "sdxl_fp8_clip_txt2img.json": sdxl_txt2img,
             "sd21_unclip_fp8_clip_vision.json": unclip_image_variation}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        (OUT / name).write_text(json.dumps(make(), indent=2) + "\n")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
