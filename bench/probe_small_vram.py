"""The example workflows on an emulated small GPU: does the FP8 CLIP fit where ComfyUI's budget is tight?

    python bench/probe_small_vram.py --comfy /path/to/ComfyUI --out OUT --vram-gb 8 [--workflows sdxl,sd15]
        [--dynamic-vram] [--small]

A card of N GB is emulated on a larger one: ComfyUI gets `--reserve-vram (total - N)` so that its model
management budgets N GB, and PyTorch's allocator is capped at N GB (`set_per_process_memory_fraction`) so that
anything beyond that fails as it would on the small card. In one executor (its cache on, as in a session),
per workflow: the stock graph; the pack's graph (calibration with the stock graph's UNet still loaded, as when a
user adds the node to a workflow that has run); a re-queue with another prompt; the calibration prompts edited
(calibration again, the UNet loaded); the stock graph with the same prompt. Records per step: success or the
error ComfyUI reports, wall time, peak memory allocated and reserved, ComfyUI's model loads and unloads, and the
PSNR between the pack's and the stock image for the same prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_example_workflows import EDITS, NodeTimer, boot_host, checkpoint, example_graphs  # noqa: E402

EXTRA_CALIBRATION_PROMPT = "a lighthouse on a cliff at dusk, long exposure"


def card_args(vram_gb: float) -> tuple[list[str], str]:
    """ComfyUI arguments and a description for a card of `vram_gb` on this GPU (nothing on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return [], "CPU (no emulation)"
    total = torch.cuda.mem_get_info()[1]
    reserve = max(0.0, (total - vram_gb * 2 ** 30) / 2 ** 30)
    return ["--reserve-vram", f"{reserve:.2f}"], (f"{torch.cuda.get_device_name()} emulating a {vram_gb:g} GB card "
                                                   f"(--reserve-vram {reserve:.2f}, allocator capped at {vram_gb:g} GiB)")


def cap_allocator(vram_gb: float) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, vram_gb * 2 ** 30 / torch.cuda.mem_get_info()[1]))


def run_steps(host, name: str, ckpt: str, small: bool, timer: NodeTimer) -> list[dict]:
    import torch

    from harness.host import new_executor, run_graph
    from harness.workflows import psnr, saved_image

    graphs = example_graphs(host, name, ckpt, small)
    prompt, stock, q, pos, save = graphs.prompt, graphs.stock, graphs.quantizer, graphs.positive, graphs.save
    edited = json.loads(json.dumps(prompt))
    if "calibration_prompts" in edited[q]["inputs"]:
        edited[q]["inputs"]["calibration_prompts"] += "\n" + EXTRA_CALIBRATION_PROMPT
    else:  # CLIP vision: calibrate on other built-in images by keeping a layer more in high precision
        edited[q]["inputs"]["keep_high_precision"] += ", *layers.0.mlp.fc1"
    timer.watch({n["class_type"] for n in prompt.values()})
    cuda = torch.cuda.is_available()
    ex = new_executor(host)
    steps = [("stock graph, first run", stock, None),
             ("FP8 CLIP graph, first run (calibration; the stock graph's models loaded)", prompt, None),
             ("FP8 CLIP graph, re-queued with another prompt", prompt, EDITS[0]),
             ("FP8 CLIP graph, calibration prompts edited (calibration again, UNet loaded)", edited, EDITS[1]),
             ("stock graph, the same two prompts", stock, EDITS[0]),
             ("stock graph, second prompt", stock, EDITS[1])]
    out, images = [], {}
    for i, (label, graph, text) in enumerate(steps):
        g = json.loads(json.dumps(graph))
        if text is not None:
            g[pos]["inputs"]["text"] = text
        g[save]["inputs"]["filename_prefix"] = f"{name}-step{i}"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rec: dict = {"step": label}
        try:
            result = run_graph(host, g, ex)
            rec["ok"] = True
            for v in result.values():  # the quantize node's report, when it ran (PreviewAny shows it)
                shown = (v.get("text") or [""])[0] if isinstance(v, dict) else ""
                rec.setdefault("report", []).extend(
                    ln.strip() for ln in str(shown).splitlines()
                    if "matches the calibrated" in ln or ln.startswith(("Calibration:", "  conditioning")))
            images[(graph is stock, text)] = saved_image(host.base, result, save)
        except Exception as e:  # noqa: BLE001 - the finding is the error itself
            rec["ok"], rec["error"] = False, str(e)[:600]
        if cuda:
            torch.cuda.synchronize()
            rec["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
            rec["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2 ** 20)
            rec["allocated_after_mb"] = round(torch.cuda.memory_allocated() / 2 ** 20)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        node_ms, moves = timer.take()
        rec["node_ms"] = {k: [round(x, 1) for x in v] for k, v in node_ms.items()}
        rec["model_moves"] = dict(Counter(moves))
        rec["report"] = list(dict.fromkeys(rec.get("report", [])))  # the node and PreviewAny show the same text
        print(json.dumps(rec), flush=True)
        out.append(rec)
    for text in (EDITS[0], EDITS[1]):
        pack_img, stock_img = images.get((False, text)), images.get((True, text))
        if pack_img is not None and stock_img is not None:
            out.append({"psnr_pack_vs_stock_db": round(psnr(pack_img, stock_img), 1), "prompt": text})
    a, b = images.get((True, EDITS[0])), images.get((True, EDITS[1]))
    if a is not None and b is not None:
        out.append({"psnr_stock_other_prompt_db": round(psnr(a, b), 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--vram-gb", type=float, default=8.0)
    ap.add_argument("--workflows", default="sdxl,sd15")
    ap.add_argument("--small", action="store_true", help="small SD1.5 UNet, 64x64 images (CPU dry run)")
    ap.add_argument("--dynamic-vram", action="store_true", help="v0.29's default on NVIDIA (comfy-aimdo)")
    ap.add_argument("--fixtures", type=Path, default=Path("/tmp/fp8clip-example-fixtures"))
    args = ap.parse_args()
    import torch

    comfy_args, card = card_args(args.vram_gb)
    host, base = boot_host(args.comfy, args.fixtures, args.dynamic_vram, tuple(comfy_args))
    # made on the whole GPU (with the host's savers), before the cap: not what is measured
    ckpts = {name: checkpoint(base, name, args.small) for name in args.workflows.split(",")}
    cap_allocator(args.vram_gb)
    args.out.mkdir(parents=True, exist_ok=True)
    timer = NodeTimer(host.nodes.NODE_CLASS_MAPPINGS)
    results = {"device": card, "torch": torch.__version__,
               "mode": "dynamic VRAM" if args.dynamic_vram else "static patcher"}
    for name, ckpt in ckpts.items():
        results[name] = run_steps(host, name, ckpt, args.small, timer)
        (args.out / "small_vram.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
