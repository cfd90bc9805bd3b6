"""The example workflows queued over HTTP to ComfyUI's own server, started as a user starts it, on the GPU.

    python bench/probe_http_server.py --comfy /path/to/ComfyUI --out OUT [--workflows sd15,sdxl,unclip]
        [--small] [--comfy-args "--disable-dynamic-vram"]

The other benches call ComfyUI's executor in their own process, from the main thread, with ModelOpt's eager
FP8 formula forced. Here `python main.py` runs with its defaults (v0.29 on an NVIDIA GPU: dynamic VRAM), its
prompt-worker thread runs the graphs, and the pack imports ModelOpt as it does for a user. In one server session,
per workflow (the UI-format example converted to the API prompt the browser sends):
the stock graph (quantize node bypassed); the pack's graph (calibration, report, FP8 conversion); a re-queue
with an edited prompt, and stock with that prompt; the calibration prompts edited (CLIP vision: min_cosine)
and the queue interrupted (/interrupt) while the quantize node runs; the same graph queued again; /free with
unload_models, then that graph with another prompt (quantize node cached: the FP8 towers come back) and stock.
Records per step: the outcome ComfyUI reports (and the node it stopped in), wall and executor time, GPU memory
from /system_stats, PSNR between the pack's and stock's image for the same prompt; and the server log's
warnings, errors and ModelOpt's extension messages. Absolute times only mean something from a GPU run.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_example_workflows import EDITS, checkpoint, example_graphs, example_image  # noqa: E402

EXTRA_CALIBRATION_PROMPT = "a lighthouse on a cliff at dusk, long exposure"
LOG_PATTERNS = r"Traceback|Error|error|WARNING|Warning|extension|fp8clip|FP8 CLIP|interrupt|out of memory"


def queue(server, prompt: dict) -> str:
    return server.post("/prompt", {"prompt": prompt, "client_id": "fp8clip-probe"})["prompt_id"]


def wait(server, pid: str, timeout: float = 900) -> dict:
    """The history entry of prompt `pid` once it has ended, successful or not."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        entry = server.get(f"/history/{pid}").get(pid)
        if entry and (entry.get("status", {}).get("completed") or
                      entry.get("status", {}).get("status_str") in ("success", "error")):
            return entry
        if server.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited:\n{server.log()[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"prompt {pid} did not end in {timeout} s")


def outcome(entry: dict) -> dict:
    msgs = entry.get("status", {}).get("messages", [])
    stamps = {m[0]: m[1].get("timestamp") for m in msgs if isinstance(m[1], dict)}
    out = {"status": entry.get("status", {}).get("status_str")}
    if stamps.get("execution_start"):
        end = next((stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted")
                    if stamps.get(k)), None)
        if end:
            out["executor_s"] = round((end - stamps["execution_start"]) / 1e3, 3)
    for kind in ("execution_error", "execution_interrupted"):
        m = next((m[1] for m in msgs if m[0] == kind), None)
        if m:
            out[kind] = {k: m.get(k) for k in ("node_type", "exception_type", "exception_message") if m.get(k)}
    return out


def gpu_memory_mb(server) -> dict:
    dev = server.get("/system_stats")["devices"][0]
    mb = lambda b: round(b / 2 ** 20)  # noqa: E731
    return {"vram_used_mb": mb(dev["vram_total"] - dev["vram_free"]),
            "torch_reserved_mb": mb(dev.get("torch_vram_total", 0))}


def run_steps(server, name: str, ckpt: str, small: bool, interrupt_after: float) -> list[dict]:
    from harness.workflows import psnr, saved_image

    info = server.get("/object_info")
    g = example_graphs(lambda t: info[t]["input"], name, ckpt, small)
    steps, images = [], {}

    def step(label: str, graph: dict, text: str | None = None, interrupt: bool = False,
             image_key: str | None = None) -> dict:
        graph = json.loads(json.dumps(graph))
        if text is not None:
            graph[g.positive]["inputs"]["text"] = text
        graph[g.save]["inputs"]["filename_prefix"] = f"{name}-{len(steps)}"
        t0 = time.perf_counter()
        pid = queue(server, graph)
        if interrupt:
            while not any(item[1] == pid for item in server.get("/queue")["queue_running"]):
                time.sleep(0.05)
            time.sleep(interrupt_after)
            server.post("/interrupt", {})
        entry = wait(server, pid)
        cached = next((m[1].get("nodes", []) for m in entry.get("status", {}).get("messages", [])
                       if m[0] == "execution_cached"), [])
        rec = {"step": label, **outcome(entry), "quantize_node_cached": g.quantizer in cached, "wall_s": round(time.perf_counter() - t0, 2), **gpu_memory_mb(server)}
        if rec["status"] == "success" and image_key:
            images[image_key] = saved_image(server.base, entry["outputs"], g.save)
            rec["image"] = image_key
            preview = next((k for k, n in graph.items() if n["class_type"] == "PreviewAny"), None)
            if preview in entry["outputs"]:
                text = entry["outputs"][preview]["text"][0]
                rec["calibration"] = "reused" if "Calibration and report reused" in text else "calibrated"
                if not any("report" in s for s in steps):
                    rec["report"] = text
        steps.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "report"}), flush=True)
        return rec

    edited_calibration = json.loads(json.dumps(g.prompt))
    field = "calibration_prompts" if g.prompt[g.quantizer]["class_type"] == "FP8CLIPQuantize" else None
    if field:
        edited_calibration[g.quantizer]["inputs"][field] += "\n" + EXTRA_CALIBRATION_PROMPT
    else:  # CLIP vision calibrates on images (built-in here): another threshold makes the node run again
        edited_calibration[g.quantizer]["inputs"]["min_cosine"] = 0.985

    step("stock", g.stock, image_key="stock")
    step("FP8 graph, first run", g.prompt, image_key="pack")
    step("FP8 graph, edited prompt", g.prompt, EDITS[0], image_key="pack-edit")
    step("stock, edited prompt", g.stock, EDITS[0], image_key="stock-edit")
    step(f"calibration edited, /interrupt after {interrupt_after} s", edited_calibration, interrupt=True)
    step("calibration edited, queued again", edited_calibration, image_key="pack-recalibrated")
    server.post("/free", {"unload_models": True})
    time.sleep(3)  # the prompt worker reads the flag between prompts (at most ~1 s idle wait)
    steps.append({"step": "/free unload_models", **gpu_memory_mb(server)})
    step("FP8 graph after /free, another prompt", edited_calibration, EDITS[1], image_key="pack-free")
    step("stock, that prompt", g.stock, EDITS[1], image_key="stock-free")

    pairs = {"same prompt": ("pack", "stock"), "edited prompt": ("pack-edit", "stock-edit"),
             "recalibrated": ("pack-recalibrated", "stock"), "after /free": ("pack-free", "stock-free"),
             "stock vs stock, another prompt": ("stock", "stock-edit")}
    steps.append({"psnr_db": {k: round(psnr(images[a], images[b]), 1) for k, (a, b) in pairs.items()
                              if a in images and b in images}})
    print(json.dumps(steps[-1]), flush=True)
    return steps


def log_summary(log: str) -> list[str]:
    from collections import Counter

    lines = [ln for ln in log.splitlines() if re.search(LOG_PATTERNS, ln)]
    keys = [re.sub(r"\d+(\.\d+)?", "#", ln) for ln in lines]  # repeated lines once, with a count
    count, first = Counter(keys), {}
    for k, ln in zip(keys, lines):
        first.setdefault(k, ln)
    return [f"{ln}  (x{count[k]})" for k, ln in first.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--workflows", default="sd15,sdxl,unclip")
    ap.add_argument("--small", action="store_true", help="small SD1.5 UNet, 64x64 images (CPU dry run)")
    ap.add_argument("--comfy-args", default="", help="extra arguments for ComfyUI's main.py")
    ap.add_argument("--interrupt-after", type=float, default=0.5,
                    help="seconds after the edited graph starts running before /interrupt")
    ap.add_argument("--fixtures", type=Path, default=Path("/tmp/fp8clip-http-fixtures"))
    ap.add_argument("--profile-prompts", action="store_true",
                    help="cProfile each prompt in the server: OUT/profiles/prompt-NN.{prof,txt}, numbered in order")
    args = ap.parse_args()
    import os

    import torch

    from bench_text_encode import boot
    from harness.host import HeadlessServer, make_base

    os.environ["FP8CLIP_HOST"] = str(args.comfy.resolve())
    cuda = torch.cuda.is_available()
    boot(args.comfy, [] if cuda else ["--cpu"])  # the checkpoints are built with the host's own layers
    args.out.mkdir(parents=True, exist_ok=True)
    base = make_base(args.fixtures / "base")
    example_image(base)
    names = args.workflows.split(",")
    ckpts = {n: checkpoint(base, n, args.small) for n in names}
    device = torch.cuda.get_device_name() if cuda else "CPU"
    if cuda:
        torch.cuda.empty_cache()  # this process made the checkpoints; the server gets the GPU
    results = {"device": device, "comfy_args": args.comfy_args, "workflows": {}}
    log_path = args.out / "server.log"
    extra = ("--disable-api-nodes", *shlex.split(args.comfy_args))
    if args.profile_prompts:  # read by bench/server_profiler/sitecustomize.py in the server's process
        os.environ["FP8CLIP_PROFILE_DIR"] = str((args.out / "profiles").resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench" / "server_profiler"),
                                                                  os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with HeadlessServer(base, extra, log_path=log_path, cpu=not cuda) as server:
        results["server_ready_s"] = round(time.perf_counter() - t0, 1)
        results["system_stats"] = server.get("/system_stats").get("system", {})
        for n in names:
            results["workflows"][n] = run_steps(server, n, ckpts[n], args.small, args.interrupt_after)
            (args.out / "http_server.json").write_text(json.dumps(results, indent=1))
    results["server_log"] = log_summary(log_path.read_text(errors="replace"))
    (args.out / "http_server.json").write_text(json.dumps(results, indent=1))
    print("\n".join(results["server_log"]))


if __name__ == "__main__":
    main()
