"""The FP8 runtime's CUDA-graph capture under PyTorch's cudaMallocAsync allocator (ComfyUI's default on
NVIDIA GPUs), where the first CLIP vision encode aborted the process ("uncaptured free of a captured
allocation", then "CUDA error: invalid argument" in the allocator's free).

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python bench/probe_capture_async.py --comfy /path/to/ComfyUI

Calibrates a CLIP vision once and saves it; then each configuration runs in a process of its own (an abort ends
only that one): the vision model loaded from the file with fp16/fp32 activations, batch 1/8, each attention
backend, graphs on/off; and a CLIP-L text encoder calibrated there, encoding with its last layer and with
clip skip (CLIPSetLastLayer -2, which asks the transformer for an intermediate layer, as SDXL always does).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_text_encode import boot, eager_modelopt, load_pack  # noqa: E402

# name: (activations, batch, SDPA backend or "" for the host's choice, CUDA graphs, kernels between the matmuls);
# `default`: the auto plan's fp16. Text children run the `auto` plan (fused kernels in graphs).
CONFIGS = {
    "default-b8": ("float16", 8, "", True, "fused"),
    "default-b1": ("float16", 1, "", True, "fused"),
    "default-b1-after-b8": ("float16", (8, 1, 8), "", True, "fused"),  # graphs sharing the fused kernels' buffers
    "fp32-b8": ("float32", 8, "", True, "fused"),
    "unfused-b8": ("float16", 8, "", True, "torch"),
    "sdpa-math-b8": ("float16", 8, "math", True, "fused"),
    "sdpa-flash-b8": ("float16", 8, "flash", True, "fused"),
    "sdpa-efficient-b8": ("float16", 8, "efficient", True, "fused"),
    "sdpa-cudnn-b8": ("float16", 8, "cudnn", True, "fused"),
    "no-graphs-b8": ("float16", 8, "", False, "fused"),
    "text-last-layer": ("float32", 1, "", True, ""),
    "text-clip-skip-2": ("float32", 1, "", True, ""),
    "text-pair-then-long": ("float32", 1, "", True, ""),
}


def text_child(name: str) -> None:
    import torch
    from bench_text_encode import fixture, load_fixture_clip
    from comfyui_fp8_clip.quant import calibrate, runtime

    eager_modelopt()
    clip = load_fixture_clip(fixture(Path("/tmp/fx/bench-clip_l.safetensors"))[0])
    with torch.inference_mode():
        fake, _ = calibrate.quantize_clip(clip, ["a cat on a mat", "a red fox in the snow"], held_out=["a house"])
        fp8, _ = runtime.to_fp8_runtime(fake, "auto")
        if name.endswith("skip-2"):
            fp8 = fp8.clone()
            fp8.clip_layer(-2)
        texts = ["a lighthouse on a stormy sea"]
        if name.endswith("then-long"):  # 1 row, 3 rows (a larger graph: its buffers grow), 1 row again
            texts = [texts[0], ", ".join(f"detail {i}" for i in range(70)), texts[0]]
        first = calibrate.encode(fp8, texts[0])[0]
        for t in texts * 2:
            out = calibrate.encode(fp8, t)[0]
        same = bool(torch.equal(out, first))  # a graph replayed after others shared its buffers
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        plan = artifact_plan(fp8)
    print("RESULT", json.dumps({"ok": True, "norm": float(out.float().norm()), "same_as_first": same,
                                "plan": plan}), flush=True)


def artifact_plan(clip) -> list:
    from comfyui_fp8_clip.quant import artifact
    return [{"executor": m.executor, "fused": m.fused, "graphs": m.graphs, "captured": len(m._graphs)}
            for m, _r in artifact.quantized_towers(clip).values()]


def child(args) -> None:
    import torch

    boot(args.comfy, [] if torch.cuda.is_available() else ["--cpu"])
    load_pack()
    if args.child.startswith("text"):
        return text_child(args.child)
    from comfyui_fp8_clip.quant import artifact, runtime, serialize_vision
    from comfyui_fp8_clip.quant.images import synthetic_images
    from torch.nn.attention import SDPBackend, sdpa_kernel

    act, batch, backend, graphs, kernels = CONFIGS[args.child]
    cv, _ = serialize_vision.load_fp8_clip_vision(args.file, "auto")
    for m, _r in artifact.quantized_towers(cv).values():
        m.configure(lambda d: runtime.Plan("fp8", "scaled_mm", "cuda_graph", act, "probe", kernels, graphs=graphs))
    batches = batch if isinstance(batch, tuple) else (batch,)
    images = synthetic_images(max(batches), seed=31)[0]
    ctx = sdpa_kernel([getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                                            "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[backend])]) \
        if backend else torch.autograd.grad_mode.no_grad()
    with torch.inference_mode(), ctx:
        first = cv.encode_image(images[:batches[-1]], crop=True)["image_embeds"]
        for _ in range(3):
            for b in batches:
                out = cv.encode_image(images[:b], crop=True)["image_embeds"]
        same = bool(torch.equal(out, first))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    print("RESULT", json.dumps({"ok": True, "norm": float(out.float().norm()), "same_as_first": same,
                                "plan": artifact_plan(cv)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child")
    ap.add_argument("--file", type=Path)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which of CONFIGS, comma-separated")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    import torch

    boot(args.comfy, [] if torch.cuda.is_available() else ["--cpu"])
    eager_modelopt()
    load_pack()
    import comfy.clip_vision
    from comfyui_fp8_clip.quant import serialize_vision, vision
    from comfyui_fp8_clip.quant.images import synthetic_images
    from comfyui_fp8_clip.quant.recipe import Recipe
    from harness.fixtures import write_clip_vision

    vfile = Path("/tmp/fx/bench-clip_vision.safetensors")
    if not vfile.exists():
        write_clip_vision(vfile)
    with torch.inference_mode():
        cv = comfy.clip_vision.load(str(vfile))
        fake, _ = vision.quantize_clip_vision(cv, synthetic_images(16, seed=5)[0],
                                              Recipe(keep=vision.DEFAULT_VISION_KEEP, fp8_embedding=False),
                                              held_out=synthetic_images(4, seed=6)[0])
        path = serialize_vision.save_fp8_clip_vision(fake, tempfile.mkdtemp(prefix="fp8clip-vcap-"), "probe")
    print("allocator", torch.cuda.get_allocator_backend() if torch.cuda.is_available() else "cpu", flush=True)
    results = {}
    for name in args.configs.split(","):
        p = subprocess.run([sys.executable, __file__, "--comfy", str(args.comfy), "--child", name, "--file", str(path)],
                           capture_output=True, text=True, timeout=240, env=os.environ)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        warn = [ln.strip()[:160] for ln in p.stderr.splitlines() if "captured allocation" in ln or "CUDA error" in ln
                or "Error" in ln][:4]
        results[name] = {"exit": p.returncode, "ok": bool(line), "messages": warn,
                         **(json.loads(line[len("RESULT "):]) if line else {})}
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vision_capture.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
