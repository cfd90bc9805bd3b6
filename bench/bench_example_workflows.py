"""The shipped example workflows, whole, in ComfyUI's own executor: stock CLIP vs the pack's FP8 CLIP.

    python bench/bench_example_workflows.py --comfy /path/to/ComfyUI --out OUT [--workflows sd15,sdxl,unclip]
        [--small] [--dynamic-vram]

Each example_workflows/*.json is converted to the API prompt the browser queues (harness/workflows.py) and run
in one process with one PromptExecutor (its cache on, as in a ComfyUI session) on seeded checkpoints at the
real configs (harness/checkpoints.py; `--small`: a small UNet and 64x64 images, for a CPU dry run). Per
workflow: the stock graph (the quantize node bypassed) cold, then re-queued with edited positive prompts; then
the pack's graph cold (calibration and report included), then re-queued with the same prompts. Records graph
wall times, each node's time inside the graph, ComfyUI's model loads / unloads, and how close the pack's
images are to stock's for the same prompt (PSNR; for scale, stock against itself with another prompt).
Absolute times only mean something from a GPU run; see bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

EDITS = ["a red fox in a snowy forest, golden hour", "portrait of an old fisherman, dramatic lighting",
         "a bowl of ramen on a wooden table, steam, 35mm photo"]
QUANTIZERS = {"FP8CLIPQuantize": "clip", "FP8CLIPVisionQuantize": "clip_vision"}
WORKFLOWS = {"sd15": "sd15_fp8_clip_txt2img.json", "sdxl": "sdxl_fp8_clip_txt2img.json",
             "unclip": "sd21_unclip_fp8_clip_vision.json"}


def write_checkpoint(name: str, path: Path, small: bool, device: str) -> None:
    from harness import fixtures
    from harness.checkpoints import checkpoint_state_dict

    text, vision = {"clip_l": (fixtures.CLIP_L_TEXT, 0)}, None
    kind = {"sd15": "sd15", "sdxl": "sdxl", "unclip": "sd21-unclip-h"}[name] + ("-mini" if small else "")
    if name == "sdxl":
        text["clip_g"] = (fixtures.CLIP_G_TEXT, 10)
    if name == "unclip":
        text = {"clip_h": (fixtures.CLIP_H_TEXT, 40)}
        vision = fixtures.clip_vision_state_dict(fixtures.CLIP_VIT_H, seed=21, device=device)
    sd = checkpoint_state_dict(kind, {k: fixtures.clip_text_state_dict(c, seed=s, device=device)
                                      for k, (c, s) in text.items()}, vision, device=device)
    fixtures.save_atomic(sd, path, {"fixture": f"seeded random weights, not a trained model ({kind})"})


class NodeTimer:
    """Times every call of the given node classes inside the executor (synchronized on the GPU), and counts
    ComfyUI's model loads and unloads, to see where a re-queued graph spends its time."""

    def __init__(self, node_classes: dict):
        import comfy.model_management as mm

        self.node_classes = node_classes
        self.times: dict[str, list[float]] = {}
        self.moves: list[str] = []
        for meth in ("model_load", "model_unload"):
            orig = getattr(mm.LoadedModel, meth)

            def counted(lm, *a, _orig=orig, _m=meth, **k):
                self.moves.append(f"{_m} {type(lm.model.model).__name__}")
                return _orig(lm, *a, **k)

            setattr(mm.LoadedModel, meth, counted)

    def watch(self, names: set[str]) -> None:
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for t in names:
            cls = self.node_classes[t]
            fn = getattr(cls, getattr(cls, "FUNCTION", ""), None)
            if not callable(fn) or getattr(fn, "_fp8clip_timed", False):
                continue

            def timed(*a, _fn=fn, _t=t, **k):
                sync()
                t0 = time.perf_counter()
                out = _fn(*a, **k)
                sync()
                self.times.setdefault(_t, []).append((time.perf_counter() - t0) * 1e3)
                return out

            timed._fp8clip_timed = True
            setattr(cls, cls.FUNCTION, timed)

    def take(self) -> tuple[dict[str, list[float]], list[str]]:
        out, moves, self.times, self.moves = self.times, self.moves, {}, []
        return out, moves


def example_graphs(input_types, name: str, ckpt: str, small: bool) -> SimpleNamespace:
    """The example workflow `name` as the API prompt the browser queues, on checkpoint `ckpt`: `.prompt` (the
    pack's graph), `.stock` (its quantize node bypassed), node ids `.quantizer`, `.positive` (the prompt's text
    node) and `.save`. `input_types`: an in-process host, or a node type's inputs (/object_info's "input")."""
    from harness.workflows import bypass, to_api

    if hasattr(input_types, "nodes"):
        nodes = input_types.nodes.NODE_CLASS_MAPPINGS
        input_types = lambda t: nodes[t].INPUT_TYPES()  # noqa: E731
    wf = json.loads((ROOT / "example_workflows" / WORKFLOWS[name]).read_text())
    prompt = to_api(wf, input_types)
    ids = {n["class_type"]: k for k, n in prompt.items()}
    loader = ids.get("CheckpointLoaderSimple") or ids["unCLIPCheckpointLoader"]
    prompt[loader]["inputs"]["ckpt_name"] = ckpt
    if small:
        prompt[ids["EmptyLatentImage"]]["inputs"].update(width=64, height=64)
    q = next(ids[t] for t in QUANTIZERS if t in ids)
    pos = prompt[ids["KSampler"]]["inputs"]["positive"][0]
    if prompt[pos]["class_type"] != "CLIPTextEncode":  # unCLIP: text -> unCLIPConditioning -> sampler
        pos = prompt[pos]["inputs"]["conditioning"][0]
    return SimpleNamespace(prompt=prompt, stock=bypass(prompt, q, QUANTIZERS[prompt[q]["class_type"]]),
                           quantizer=q, positive=pos, save=ids["SaveImage"])


def boot_host(comfy: Path, fixtures: Path, dynamic_vram: bool, comfy_args: tuple[str, ...] = ()):
    """ComfyUI in this process with the pack (on the GPU when there is one), its base folder under `fixtures`
    with the unCLIP example's input image; returns (host, base)."""
    import torch

    from harness.host import boot_in_process, make_base

    os.environ["FP8CLIP_HOST"] = str(comfy.resolve())
    cuda = torch.cuda.is_available()
    base = make_base(fixtures / "base")
    if dynamic_vram:
        from bench_text_encode import boot
        boot(comfy, ["--base-directory", str(base), *comfy_args], dynamic_vram=True)
    host = boot_in_process(base, comfy_args, cpu=not cuda)
    if cuda:
        from bench_text_encode import eager_modelopt
        eager_modelopt()
    example_image(base)
    return host, base


def example_image(base: Path) -> None:
    """The unCLIP example's input image, in the base folder's input/."""
    from PIL import Image

    from quant.images import synthetic_images

    img = synthetic_images(1, seed=7, size=512)[0][0]
    Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).save(base / "input" / "example.png")


def checkpoint(base: Path, name: str, small: bool) -> str:
    """The seeded checkpoint of workflow `name` in `base`, written the first time; its file name."""
    import torch

    ckpt = f"fp8clip-bench-{name}{'-small' if small else ''}.safetensors"
    path = base / "models" / "checkpoints" / ckpt
    if not path.exists():
        write_checkpoint(name, path, small, "cuda" if torch.cuda.is_available() else "cpu")
    return ckpt


def run_workflow(host, name: str, ckpt: str, args, timer: NodeTimer) -> dict:
    import torch

    from harness.host import new_executor, run_graph
    from harness.workflows import psnr, saved_image

    graphs = example_graphs(host, name, ckpt, args.small)
    prompt, stock, q, pos_node, save = graphs.prompt, graphs.stock, graphs.quantizer, graphs.positive, graphs.save
    timer.watch({n["class_type"] for n in prompt.values()})
    cuda = torch.cuda.is_available()
    ex = new_executor(host)
    res: dict = {"workflow": WORKFLOWS[name], "checkpoint": ckpt}

    def one(graph: dict, text: str | None, prefix: str) -> tuple[float, np.ndarray, dict]:
        g = json.loads(json.dumps(graph))
        if text is not None:
            g[pos_node]["inputs"]["text"] = text
        g[save]["inputs"]["filename_prefix"] = prefix
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run_graph(host, g, ex)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0), saved_image(host.base, out, save), out

    for label, graph in (("stock", stock), ("pack", prompt)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cold_s, first_img, out = one(graph, None, f"{name}-{label}-cold")
        cold_enc, cold_moves = timer.take()
        if label == "pack":
            preview = next(k for k, n in prompt.items() if n["class_type"] == "PreviewAny")
            res["report"] = out[preview]["text"][0]
        imgs, times = [first_img], []
        for i, text in enumerate((EDITS * args.requeues)[:args.requeues]):
            prof = None
            if args.profile and i == args.requeues - 1:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            s, img, _ = one(graph, text, f"{name}-{label}-{i}")
            if prof is not None:
                import io
                import pstats
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
                (args.out / f"profile_{name}_{label}.txt").write_text(buf.getvalue())
            times.append(s)
            imgs.append(img)
        enc, moves = timer.take()
        res[label] = {"cold_graph_s": round(cold_s, 2), "requeue_graph_s": [round(t, 3) for t in times],
                      "cold_node_ms": {k: [round(x, 2) for x in v] for k, v in cold_enc.items()},
                      "requeue_node_ms": {k: [round(x, 2) for x in v] for k, v in enc.items()},
                      "cold_model_moves": cold_moves, "requeue_model_moves": moves,
                      # the process's peak so far: models of earlier phases stay loaded, so not a comparison
                      "peak_gpu_mb_so_far": round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None}
        res[label + "_images"] = imgs
    if args.switch_runtime:
        res["runtime_switch"] = switch_runtime(prompt, q, one, timer, res["pack_images"][-1],
                                               (EDITS * args.requeues)[:args.requeues][-1] if args.requeues else None)
    s_imgs, p_imgs = res.pop("stock_images"), res.pop("pack_images")
    res["psnr_pack_vs_stock_db"] = [round(psnr(a, b), 1) for a, b in zip(p_imgs, s_imgs)]
    res["psnr_stock_other_prompt_db"] = [round(psnr(s_imgs[i], s_imgs[i + 1]), 1) for i in range(len(s_imgs) - 1)]
    res["image_shape"] = list(s_imgs[0].shape)
    res["identical_images"] = sum(bool((a == b).all()) for a, b in zip(p_imgs, s_imgs))
    return res


def switch_runtime(prompt: dict, q: str, one, timer: NodeTimer, last_img: np.ndarray, last_text: str | None) -> dict:
    """What a user sees who flips the quantize node's runtime to fake-quant and back to auto, with the graph's last
    prompt: the quantize node's time each way (the calibration is remembered, so it should not run again), whether
    its report says so, and whether auto's image afterwards equals auto's image before the switch."""
    from harness.workflows import psnr

    out = {}
    preview = next(k for k, n in prompt.items() if n["class_type"] == "PreviewAny")
    for runtime in ("fake-quant", "auto"):
        g = json.loads(json.dumps(prompt))
        g[q]["inputs"]["runtime"] = runtime
        _, img, ui = one(g, last_text, f"switch-{runtime}")
        times, _ = timer.take()
        report = ui.get(preview, {}).get("text", [""])[0]
        out[runtime] = {"quantize_node_ms": [round(x, 1) for t, v in times.items() if t in QUANTIZERS for x in v],
                        "report_says_reused": "reused from the run" in report,
                        "psnr_vs_auto_before_db": round(psnr(img, last_img), 1),
                        "identical_to_auto_before": bool((img == last_img).all())}
    return out


def table(results: dict, device: str) -> str:
    def med(v):
        return statistics.median(v) if v else float("nan")

    lines = [f"Device: {device}.", "",
             "| workflow | variant | first run s | re-queue with an edited prompt s (median) | CLIPTextEncode "
             "in the graph ms (median of the re-queues) | CLIPVisionEncode ms (first run) | "
             "PSNR vs stock, same prompt (min) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label in ("stock", "pack"):
            v = r[label]
            enc = v["requeue_node_ms"].get("CLIPTextEncode", [])
            vis = v["cold_node_ms"].get("CLIPVisionEncode", [])
            ratio = ""
            if label == "pack":
                s_enc = med(r["stock"]["requeue_node_ms"].get("CLIPTextEncode", []))
                ratio = f" ({s_enc / med(enc):.1f}x)" if enc else ""
            lines.append(f"| {name} | {'stock CLIP' if label == 'stock' else 'FP8 CLIP (pack, runtime auto)'} | "
                         f"{v['cold_graph_s']:.2f} | {med(v['requeue_graph_s']):.3f} | {med(enc):.2f}{ratio} | "
                         f"{f'{vis[0]:.1f}' if vis else ''} | "
                         f"{min(r['psnr_pack_vs_stock_db']) if label == 'pack' else ''} |")
    lines += ["", "Re-queues, median ms per node and ComfyUI's model loads / unloads over the re-queues:", ""]
    for name, r in results.items():
        for label in ("stock", "pack"):
            v = r[label]
            nodes = ", ".join(f"{k} {med(x):.1f}" for k, x in sorted(v["requeue_node_ms"].items()))
            moves = "; ".join(f"{m} x{v['requeue_model_moves'].count(m)}" for m in sorted(set(v["requeue_model_moves"])))
            lines.append(f"- {name}, {label}: {nodes}; model moves: {moves or 'none'}")
    lines.append("")
    for name, r in results.items():
        cold = [x for t, v in r["pack"]["cold_node_ms"].items() if t in QUANTIZERS for x in v]
        for runtime, v in r.get("runtime_switch", {}).items():
            image = "identical" if v["identical_to_auto_before"] else f"PSNR {v['psnr_vs_auto_before_db']} dB"
            lines.append(f"- {name}, runtime switched to {runtime}: quantize node {v['quantize_node_ms']} ms (first "
                         f"run {cold} ms), report says reused: {v['report_says_reused']}, image vs auto's before the "
                         f"switch: {image}")
    lines.append("")
    for name, r in results.items():
        lines += [f"{name}: PSNR pack vs stock {r['psnr_pack_vs_stock_db']} dB; stock vs stock with the next "
                  f"prompt {r['psnr_stock_other_prompt_db']} dB; images {r['image_shape']}", "", "```",
                  r.get("report", ""), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--workflows", default="sd15,sdxl,unclip")
    ap.add_argument("--requeues", type=int, default=3, help="re-queues per variant, cycling 3 prompts")
    ap.add_argument("--profile", action="store_true", help="cProfile the last re-queue of each variant")
    ap.add_argument("--no-switch-runtime", dest="switch_runtime", action="store_false",
                    help="skip re-queuing with the quantize node's runtime switched to fake-quant and back")
    ap.add_argument("--small", action="store_true", help="small SD1.5 UNet, 64x64 images (CPU dry run)")
    ap.add_argument("--dynamic-vram", action="store_true", help="v0.29's default on NVIDIA (comfy-aimdo)")
    ap.add_argument("--fixtures", type=Path, default=Path("/tmp/fp8clip-example-fixtures"))
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    host, base = boot_host(args.comfy, args.fixtures, args.dynamic_vram)
    args.out.mkdir(parents=True, exist_ok=True)
    timer = NodeTimer(host.nodes.NODE_CLASS_MAPPINGS)
    results = {}
    for name in args.workflows.split(","):
        t0 = time.perf_counter()
        ckpt = checkpoint(base, name, args.small)
        print(f"{name}: checkpoint ready in {time.perf_counter() - t0:.0f} s", flush=True)
        results[name] = run_workflow(host, name, ckpt, args, timer)
        print(json.dumps({k: v for k, v in results[name].items() if k != "report"}, indent=1), flush=True)
        (args.out / "example_workflows.json").write_text(json.dumps(results, indent=1))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    mode = "dynamic VRAM" if args.dynamic_vram else "static patcher"
    md = table(results, f"{device}, torch {torch.__version__}, {mode}")
    (args.out / "example_workflows.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
