"""Builds the UI-format example workflows in example_workflows/ (run: python -m harness.workflows).

UI format (nodes, links, positional widgets_values) is what users drag into ComfyUI and share; writing it
from one builder keeps widget order and link types consistent with the nodes' INPUT_TYPES.
"""
from __future__ import annotations

import json
from pathlib import Path

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


QUANTIZE_WIDGETS = [DEFAULT_CALIBRATION_TEXT, "*text_projection", "max", "weights+activations", 0.99, "auto", True]


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


WORKFLOWS = {"sd15_fp8_clip_txt2img.json": sd15_txt2img}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        (OUT / name).write_text(json.dumps(make(), indent=2) + "\n")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
